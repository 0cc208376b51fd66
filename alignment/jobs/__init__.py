"""The jobs users run: each reads top to bottom from its config to its metrics and checkpoints."""
