"""The shapes world: a verifiable text-to-image task that runs on a CPU.

scenes (specs, captions, GenEval records, layouts, pixels) -> splits (deterministic data files) ->
detect (exact rule detector for rewards.geneval) -> train_vae (tiny VAE) -> build_world (one command:
data, VAE, NextStep pre-trained through `nsalign sft`, held-out scores).
"""
