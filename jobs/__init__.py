"""One module per `nsalign` command (jobs/cli.py lists them): each reads top to bottom from its config to
its metrics and checkpoints, using the libraries (core, base_model, rewards, rollout, shapes, alignment,
dashboard). A job never imports another job."""
