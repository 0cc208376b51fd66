"""HPSv2 / HPSv2.1 (Wu et al. 2023, arXiv:2306.09341): OpenCLIP ViT-H-14 fine-tuned on human preferences.

score = cosine(image embedding, text embedding), about 0.2-0.35 on generated images (papers print x100).
Preprocessing is HPSv2's own: to a float tensor first, then letterbox on it (longer side -> 224, bicubic
with antialias, no rounding or clamping; black padding, centred) with the OpenAI mean/std, not
open_clip's centre crop. The published `HPS_v2.1_compressed.pt` (hub xswu/HPSv2)
is a dict whose 'state_dict' holds the open_clip ViT-H-14 weights; open-clip-torch ships the
architecture and the BPE vocabulary, so the `hpsv2` package is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from core.errors import ConfigError
from rewards.base import RequiredFile, RewardOutput
from rewards.clipscore import OpenClipScorer, build_open_clip, load_open_clip_weights, open_clip_tokenizer
from rewards.common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, finish_model

MODEL_NAME = "ViT-H-14"
SOURCE = "hub xswu/HPSv2, file HPS_v2.1_compressed.pt (v2.0: HPS_v2_compressed.pt)"


@dataclass
class Config:
    """Params of `type: hps`."""

    checkpoint: str | None = None  # HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)
    size: Literal["full", "tiny"] = "full"  # tiny: a small OpenCLIP model on the same code path
    init: Literal["checkpoint", "random"] = "checkpoint"

    def validate(self, where: str) -> None:
        if self.init == "checkpoint" and self.checkpoint is None:
            raise ConfigError(f"{where}.checkpoint: required with init: checkpoint ({SOURCE})")

    def files(self) -> list[RequiredFile]:
        if self.init == "random":
            return []
        return [RequiredFile("checkpoint", str(self.checkpoint), SOURCE, "dict with 'state_dict': open_clip ViT-H-14")]


class HPSv2:
    """HPSv2 score (cosine) of each (image, prompt)."""

    name = "hps"

    def __init__(self, scorer: OpenClipScorer):
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput(scores=self.scorer.cosine(images, prompts))


def build(config: Config, device: torch.device, dtype: torch.dtype) -> HPSv2:
    """The HPSv2 reward on `device` in `dtype`."""
    tokenizer = open_clip_tokenizer(MODEL_NAME, config.size)
    model = build_open_clip(MODEL_NAME, config.size)
    if config.init == "checkpoint":
        load_open_clip_weights(model, config.checkpoint, "HPSv2 checkpoint", SOURCE, nested=True)
    scorer = OpenClipScorer(finish_model(model, device, dtype), tokenizer, "longest", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return HPSv2(scorer)
