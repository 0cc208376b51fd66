"""JPEG (in)compressibility (DDPO, Black et al. 2023, arXiv:2305.13301).

size = bytes of the image saved as JPEG at quality 95, in kB (1 kB = 1000 bytes, as DDPO);
compressibility = -size, incompressibility = +size. No model, no files; the prompt is unused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from core.errors import ConfigError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import to_pil


@dataclass
class Config:
    """Params of `type: jpeg`."""

    direction: Literal["compressibility", "incompressibility"] = "compressibility"
    quality: int = 95

    def validate(self, where: str) -> None:
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"{where}.quality: must be in 1..100, got {self.quality}")

    def files(self) -> list[RequiredFile]:
        return []


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size of `image` encoded as JPEG at `quality`, in kB."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegReward:
    """DDPO's JPEG size reward: -kB (compressibility) or +kB (incompressibility)."""

    name = "jpeg"

    def __init__(self, direction: str, quality: int):
        self.sign = -1.0 if direction == "compressibility" else 1.0
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        sizes = torch.tensor([jpeg_size_kb(im, self.quality) for im in to_pil(images)], dtype=torch.float32)  # [B]
        return RewardOutput(scores=self.sign * sizes, components={"size_kb": sizes})


def build(config: Config, device: torch.device, dtype: torch.dtype) -> JpegReward:
    """The JPEG reward (no model; device and dtype unused)."""
    return JpegReward(config.direction, config.quality)
