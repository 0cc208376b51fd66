"""Reward models: images (uint8 [B, 3, H, W]) + prompts -> RewardOutput(scores [B], components).

base (contract, config schema, registry), one module per family (imagereward, hps, pickscore,
clipscore, aesthetic, ocr, geneval, jpeg), composite (weighted sum), worker (RewardWorker), check
(`nsalign rewards check`). Weights come from local paths only; open_clip / transformers are imported
by the family modules, never here.
"""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)
