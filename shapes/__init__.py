"""The shapes world: a verifiable text-to-image task that runs on a CPU.

scenes (specs, captions, GenEval records, layouts, pixels) -> splits (deterministic data files) ->
train_vae (tiny VAE) -> world (WorldConfig, the data files, the rule reward's config). The world's rule
detector and shaped reward are reward families (rewards/shapes_detect.py, rewards/shapes_scene.py);
`nsalign shapes-world` (jobs/shapes_world.py) rebuilds everything: data, VAE, NextStep pre-trained
through `nsalign sft`, held-out scores.
"""
