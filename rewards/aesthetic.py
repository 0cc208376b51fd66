"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

rating = MLP(normalise(CLIP ViT-L/14 image embedding)), a 1-10 aesthetic score; the prompt is unused.
The MLP is the published 768-1024-128-64-16-1 head (`sac+logos+ava1-l14-linearMSE.pth`, 3.7 MB, keys
layers.{0,2,4,6,7}.*, github christophschuhmann/improved-aesthetic-predictor). The CLIP image tower
is transformers' `CLIPVisionModelWithProjection` from a local copy of hub openai/clip-vit-large-patch14
(as DDPO and Flow-GRPO load it); its text tower in that directory is ignored. Images go through that
directory's CLIP image processor (shortest side 224 bicubic, centre crop, OpenAI mean/std), or the
identical default one when no directory is given (init: random).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from core.errors import CheckpointError, ConfigError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import (
    RatingMLP,
    finish_model,
    load_exact,
    load_hf_pretrained,
    read_state_dict,
    require_file,
    seeded_init,
    to_pil,
)

CLIP_SOURCE = "hub openai/clip-vit-large-patch14 (config.json, weights, preprocessor_config.json)"
MLP_SOURCE = "github christophschuhmann/improved-aesthetic-predictor, file sac+logos+ava1-l14-linearMSE.pth"
# OpenAI CLIP ViT-L/14 image tower: 24 x 1024, patch 14, 224 px, projection to 768, quick-GELU.
FULL_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
    image_size=224, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
TINY_VISION = dict(FULL_VISION, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                   patch_size=8, image_size=64, projection_dim=32)  # fmt: skip


@dataclass
class Config:
    """Params of `type: aesthetic`."""

    mlp_checkpoint: str | None = None  # sac+logos+ava1-l14-linearMSE.pth
    clip_dir: str | None = None  # local openai/clip-vit-large-patch14
    size: Literal["full", "tiny"] = "full"  # for init: random only
    init: Literal["checkpoint", "random"] = "checkpoint"

    def validate(self, where: str) -> None:
        if self.init == "checkpoint" and (self.mlp_checkpoint is None or self.clip_dir is None):
            key = "mlp_checkpoint" if self.mlp_checkpoint is None else "clip_dir"
            raise ConfigError(f"{where}.{key}: required with init: checkpoint")

    def files(self) -> list[RequiredFile]:
        if self.init == "random":
            return []
        return [
            RequiredFile("mlp_checkpoint", str(self.mlp_checkpoint), MLP_SOURCE, "state dict layers.{0,2,4,6,7}.*"),
            RequiredFile("clip_dir", f"{self.clip_dir}/config.json", CLIP_SOURCE, "CLIP ViT-L/14 (transformers)"),
        ]


class AestheticModel(torch.nn.Module):
    """CLIP image tower + rating MLP on the L2-normalised embedding."""

    def __init__(self, vision: CLIPVisionModelWithProjection):
        super().__init__()
        self.vision = vision
        self.mlp = RatingMLP(vision.config.projection_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 224, 224] -> rating [B]."""
        emb = self.vision(pixel_values=pixels).image_embeds  # [B, 768]
        return self.mlp(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1)


def build_model(config: Config) -> AestheticModel:
    """The CLIP tower + MLP with published weights (init: checkpoint) or seeded random ones."""
    if config.init == "random":
        with seeded_init():
            vision_config = CLIPVisionConfig(**(FULL_VISION if config.size == "full" else TINY_VISION))
            return AestheticModel(CLIPVisionModelWithProjection(vision_config))
    mlp_path = require_file(config.mlp_checkpoint, "aesthetic MLP", MLP_SOURCE)
    ignore = ("text_model.", "text_projection.", "logit_scale")  # the CLIP directory holds both towers
    vision = load_hf_pretrained(CLIPVisionModelWithProjection, config.clip_dir, "CLIP ViT-L/14", CLIP_SOURCE, ignore)
    model = AestheticModel(vision)
    load_exact(model.mlp, read_state_dict(mlp_path, "aesthetic MLP"), str(mlp_path))
    return model


class Aesthetic:
    """LAION aesthetic rating (1-10) of each image; prompts are ignored."""

    name = "aesthetic"

    def __init__(self, model: AestheticModel, processor: CLIPImageProcessor):
        self.model, self.processor = model, processor
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        pixels = self.processor(images=to_pil(images), return_tensors="pt").pixel_values
        return RewardOutput(scores=self.model(pixels.to(self.device, self.dtype)).float().cpu())


def build(config: Config, device: torch.device, dtype: torch.dtype) -> Aesthetic:
    """The aesthetic reward on `device` in `dtype`."""
    model = build_model(config)
    return Aesthetic(finish_model(model, device, dtype), load_image_processor(config.clip_dir, model))


def load_image_processor(clip_dir: str | None, model: AestheticModel) -> CLIPImageProcessor:
    """The directory's CLIP image processor, or CLIP's defaults (bicubic, centre crop) at the model's size."""
    if clip_dir is None:
        s = model.vision.config.image_size
        return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    try:
        return CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"CLIP image processor at {clip_dir}: cannot load ({CLIP_SOURCE}): {e}") from None
