"""CLIPScore on any OpenCLIP model from a local checkpoint, and the OpenCLIP scorer HPSv2 reuses.

score = cosine(image embedding, text embedding), or with `formula: clip_s` the CLIP-S of Hessel et
al. 2021 (arXiv:2104.08718), w * max(cosine, 0) with w = `clip_s_weight` (2.5 in the paper, 100 in
torchmetrics). The architecture comes from open_clip's built-in config for `model_name` (no weights,
no download); the checkpoint is a state dict, or a training checkpoint with 'state_dict' (a 'module.'
prefix from DDP is stripped). `pretrained_tag` names which open_clip weights the file holds (e.g.
'openai'): their QuickGELU flag, mean/std and resize mode then apply, as open_clip would set them; OpenAI
weights run wrong with plain GELU, so name the tag (or a '-quickgelu' architecture). Models whose
tokenizer is not bundled with open_clip (HF tokenizers) cannot be built offline: a ConfigError.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import open_clip
import torch
from PIL import Image
from torch import nn

from core.errors import ConfigError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_state_dict,
    finish_model,
    letterbox,
    load_exact,
    pil_to_unit,
    read_torch_file,
    require_file,
    resize_center_crop,
    seeded_init,
    standardize,
    to_pil,
)

# A small OpenCLIP CLIP for tests and benchmarks (same code path as ViT-H-14, 32 px images).
TINY_OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
# uint8 [B, 3, H, W], size -> float [B, 3, S, S] in [0, 1]
RESIZERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "shortest": lambda x, size: pil_to_unit([resize_center_crop(im, size) for im in to_pil(x)]),  # open_clip eval
    "longest": letterbox,  # HPSv2: on the float tensor
    "squash": lambda x, size: pil_to_unit([im.resize((size, size), Image.BICUBIC) for im in to_pil(x)]),
}


@dataclass
class Config:
    """Params of `type: clipscore`."""

    model_name: str = "ViT-L-14"  # an open_clip built-in architecture name
    checkpoint: str | None = None  # OpenCLIP checkpoint for that architecture
    pretrained_tag: str | None = None  # open_clip tag of those weights, e.g. "openai"
    size: Literal["full", "tiny"] = "full"  # tiny: TINY_OPEN_CLIP instead of model_name
    init: Literal["checkpoint", "random"] = "checkpoint"
    formula: Literal["cosine", "clip_s"] = "cosine"
    clip_s_weight: float = 100.0
    resize_mode: Literal["shortest", "longest", "squash"] | None = None  # default: the tag's, else shortest
    mean: tuple[float, float, float] | None = None  # default: the tag's, else OpenAI's
    std: tuple[float, float, float] | None = None

    def validate(self, where: str) -> None:
        if self.init == "checkpoint" and self.checkpoint is None:
            raise ConfigError(f"{where}.checkpoint: required with init: checkpoint (an OpenCLIP checkpoint file)")
        if self.size == "full" and open_clip.get_model_config(self.model_name) is None:
            raise ConfigError(f"{where}.model_name: '{self.model_name}' is not an open_clip architecture")
        if self.pretrained_tag is not None and not self.tag_config():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(self.model_name))
            raise ConfigError(f"{where}.pretrained_tag: '{self.pretrained_tag}' is not one of {tags}")

    def tag_config(self) -> dict:
        """open_clip's record of the pretrained weights (preprocessing, QuickGELU, hub id), or {}."""
        if self.pretrained_tag is None:
            return {}
        return open_clip.get_pretrained_cfg(self.model_name, self.pretrained_tag) or {}

    def preprocessing(self) -> tuple[str, tuple, tuple]:
        """(resize mode, mean, std): explicit values, else the tag's, else OpenAI CLIP's."""
        tag = self.tag_config()
        return (self.resize_mode or tag.get("resize_mode", "shortest"), self.mean or tag.get("mean", OPENAI_CLIP_MEAN),
                self.std or tag.get("std", OPENAI_CLIP_STD))  # fmt: skip

    def files(self) -> list[RequiredFile]:
        if self.init == "random":
            return []
        hub = self.tag_config().get("hf_hub", "").strip("/")
        source = f"hub {hub}, file open_clip_pytorch_model.bin" if hub else f"OpenCLIP weights for {self.model_name}"
        return [RequiredFile("checkpoint", str(self.checkpoint), source, "open_clip CLIP state dict")]


def build_open_clip(model_name: str, size: str, quick_gelu: bool = False) -> nn.Module:
    """An OpenCLIP model with seeded random weights: `model_name`'s built-in config, or TINY_OPEN_CLIP."""
    with seeded_init():
        if size == "tiny":
            return open_clip.CLIP(**TINY_OPEN_CLIP)
        try:
            with quiet_root_logger():  # open_clip warns "initialized randomly" before we load weights
                return open_clip.create_model(
                    model_name, pretrained=None, pretrained_text=False, force_quick_gelu=quick_gelu,
                    device=torch.get_default_device(),
                )  # fmt: skip
        except Exception as e:  # e.g. an HF text tower that would need the hub
            raise ConfigError(f"open_clip cannot build '{model_name}' offline: {e}") from None


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Silence root-logger warnings inside the block."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_open_clip_weights(model: nn.Module, path: str | None, what: str, source: str, nested: bool = False) -> None:
    """Strictly load an OpenCLIP state dict: under 'state_dict' if `nested` (or if the file has one, as
    training checkpoints do), else bare; a 'module.' prefix from DDP is stripped."""
    file = require_file(path, what, source)
    obj = read_torch_file(file, what)
    has_nested = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    nested = "state_dict" if nested or has_nested else None
    state = as_state_dict(obj, f"{what} at {file}", nested)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_exact(model, state, str(file))


def open_clip_tokenizer(model_name: str, size: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for the model (the OpenAI BPE ships inside the wheel), context 77."""
    if size == "tiny":
        return open_clip.SimpleTokenizer(context_length=TINY_OPEN_CLIP["text_cfg"]["context_length"])
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # HF tokenizers would need the hub
        raise ConfigError(f"open_clip has no offline tokenizer for '{model_name}': {e}") from None


class OpenClipScorer:
    """Cosine similarity of OpenCLIP image and text embeddings, with a chosen resize mode."""

    def __init__(self, model: nn.Module, tokenizer: Callable, resize_mode: str, mean: tuple, std: tuple):
        self.model, self.tokenizer = model, tokenizer
        self.resize, self.mean, self.std = RESIZERS[resize_mode], mean, std
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, tuple) else size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised [B, 3, S, S]."""
        return standardize(self.resize(images, self.image_size), self.mean, self.std)

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B] float32 cosine(image_i, prompt_i), CPU."""
        check_inputs(images, prompts)
        pixels = self.preprocess(images).to(self.device, self.dtype)
        image_emb = self.model.encode_image(pixels, normalize=True).float()  # [B, E]
        text_emb = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_emb * text_emb).sum(-1).cpu()


def clip_s(cosine: torch.Tensor, weight: float) -> torch.Tensor:
    """CLIP-S = w * max(cos, 0) (Hessel et al. 2021, eq. 1)."""
    return weight * cosine.clamp(min=0.0)


class ClipScore:
    """Cosine (or CLIP-S) of each (image, prompt) under an OpenCLIP model."""

    name = "clipscore"

    def __init__(self, scorer: OpenClipScorer, formula: str, clip_s_weight: float):
        self.scorer, self.formula, self.clip_s_weight = scorer, formula, clip_s_weight

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        cos = self.scorer.cosine(images, prompts)
        scores = cos if self.formula == "cosine" else clip_s(cos, self.clip_s_weight)
        return RewardOutput(scores=scores, components={"cosine": cos})


def build(config: Config, device: torch.device, dtype: torch.dtype) -> ClipScore:
    """The CLIPScore reward on `device` in `dtype`."""
    tokenizer = open_clip_tokenizer(config.model_name, config.size)
    model = build_open_clip(config.model_name, config.size, quick_gelu=config.tag_config().get("quick_gelu", False))
    if config.init == "checkpoint":
        what = f"OpenCLIP {config.model_name} checkpoint"
        load_open_clip_weights(model, config.checkpoint, what, config.files()[0].source)
    scorer = OpenClipScorer(finish_model(model, device, dtype), tokenizer, *config.preprocessing())
    return ClipScore(scorer, config.formula, config.clip_s_weight)
