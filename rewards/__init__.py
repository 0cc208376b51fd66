"""Reward models: images + prompts -> scores. One file per family; weights from local paths only."""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)
