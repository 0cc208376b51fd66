"""Reward models: images (uint8 [B, 3, H, W]) + prompts -> RewardOutput(scores [B], components).

base (contract, config schema, registry), one module per family (imagereward, hps, pickscore,
clipscore, aesthetic, ocr, geneval, jpeg; the shapes world's shapes_detect and shapes_scene), composite
(weighted sum), worker (RewardWorker); `nsalign rewards check` is jobs/rewards_check.py. Weights come
from local paths only; open_clip / transformers are imported by the family modules, never here.
"""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)
