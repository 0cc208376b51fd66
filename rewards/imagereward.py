"""ImageReward (Xu et al., NeurIPS 2023, arXiv:2304.05977): human-preference reward for text-to-image.

BLIP's ViT-L/16 encodes the image (224 px, 196 patch tokens + [CLS]); BLIP's BERT-base text encoder
reads the prompt and cross-attends to every image token; its [CLS] feature goes through the rating MLP
768-1024-128-64-16-1 and the result is standardised: (mlp - 0.16717362830052426) / 1.0333394966054072.

Files, read from local paths only (hub THUDM/ImageReward): `ImageReward.pt`, a plain state dict with
keys blip.visual_encoder.* / blip.text_encoder.* / mlp.layers.* (plus BLIP's unused contrastive
projections and a position-ids buffer, which we accept and drop), and `med_config.json` (the BERT
config). The tokenizer is bert-base-uncased WordPiece from a local `vocab.txt`, plus [DEC] and [ENC]
as the original adds them (30522 + 2 = 30524 = vocab_size); the size is checked because an offline
tokenizer load can silently yield a handful of tokens.

How this departs from the `image-reward` package: the ViT is ours (same key layout as BLIP's timm-style
ViT, attention through SDPA); the text encoder is transformers' `BlipTextModel`, the port of BLIP's
med.py BERT. Plain `BertModel` does not fit: its cross-attention keys/values take hidden_size (768)
inputs where BLIP's take the image width (1024), and it makes self-attention causal whenever cross-
attention is on, whereas ImageReward's text encoder is bidirectional (`is_decoder=False` at call time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

from core.errors import CheckpointError, ConfigError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RatingMLP,
    finish_model,
    load_exact,
    normalize,
    read_state_dict,
    require_file,
    resize_center_crop,
    seeded_init,
    to_pil,
)

SCORE_MEAN = 0.16717362830052426  # ImageReward.py: rewards = (mlp - mean) / std
SCORE_STD = 1.0333394966054072
HUB = "hub THUDM/ImageReward"
VOCAB_SOURCE = "hub google-bert/bert-base-uncased, file vocab.txt (30522 lines)"
# Present in the published file, unused for scoring: BLIP's ITC projections and a buffer.
PUBLISHED_UNUSED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)
# med_config.json as published (BLIP's BERT-base); encoder_width is set from the ViT as BLIP does.
MED_CONFIG_FULL = dict(
    vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)  # fmt: skip
MED_CONFIG_TINY = dict(
    MED_CONFIG_FULL, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)


@dataclass(frozen=True)
class ViTSize:
    """Dimensions of a BLIP ViT."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int


VIT_FULL = ViTSize(image_size=224, patch_size=16, width=1024, depth=24, num_heads=16)  # BLIP 'large'
VIT_TINY = ViTSize(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)


@dataclass
class Config:
    """Params of `type: imagereward`."""

    checkpoint: str | None = None  # ImageReward.pt
    med_config: str | None = None  # med_config.json (default: the published values built in)
    vocab_dir: str | None = None  # directory holding bert-base-uncased vocab.txt
    size: Literal["full", "tiny"] = "full"  # tiny: a small random-able variant for tests and benchmarks
    init: Literal["checkpoint", "random"] = "checkpoint"  # random: seeded random weights, never silently
    max_length: int = 35  # ImageReward.py tokenises to exactly 35 tokens

    def validate(self, where: str) -> None:
        if self.vocab_dir is None:
            raise ConfigError(f"{where}.vocab_dir: required (directory with bert-base-uncased vocab.txt)")
        if self.init == "checkpoint" and (self.checkpoint is None or self.med_config is None):
            key = "checkpoint" if self.checkpoint is None else "med_config"
            raise ConfigError(f"{where}.{key}: required with init: checkpoint ({HUB})")

    def files(self) -> list[RequiredFile]:
        vocab = RequiredFile("vocab_dir", str(Path(self.vocab_dir or ".") / "vocab.txt"), VOCAB_SOURCE, "30522 tokens")
        if self.init == "random":
            return [vocab]
        return [
            RequiredFile("checkpoint", str(self.checkpoint), f"{HUB}, file ImageReward.pt",
                         "state dict: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*"),
            RequiredFile("med_config", str(self.med_config), f"{HUB}, file med_config.json",
                         "BERT config json (hidden_size, num_hidden_layers, vocab_size, ...)"),
            vocab,
        ]  # fmt: skip


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (a strided convolution)."""

    def __init__(self, size: ViTSize):
        super().__init__()
        self.proj = nn.Conv2d(3, size.width, kernel_size=size.patch_size, stride=size.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, 3, S, S] -> [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D/H], scale head_dim^-0.5 as BLIP
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP, 4x wide."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipViT(nn.Module):
    """BLIP's ViT (pre-norm blocks, [CLS] + learned positions, final LayerNorm, no head)."""

    def __init__(self, size: ViTSize):
        super().__init__()
        num_patches = (size.image_size // size.patch_size) ** 2
        self.patch_embed = PatchEmbed(size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, size.width))
        self.blocks = nn.ModuleList([Block(size.width, size.num_heads) for _ in range(size.depth)])
        self.norm = nn.LayerNorm(size.width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, N+1, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Blip(nn.Module):
    """The parts of BLIP that ImageReward uses (keys blip.visual_encoder.*, blip.text_encoder.*)."""

    def __init__(self, vit: ViTSize, text: dict):
        super().__init__()
        self.visual_encoder = BlipViT(vit)
        # is_decoder=True only makes the layers own cross-attention; forward runs bidirectionally.
        config = BlipTextConfig(**text, encoder_hidden_size=vit.width, is_decoder=True)
        self.text_encoder = BlipTextModel(config, add_pooling_layer=False)


class ImageRewardModel(nn.Module):
    """BLIP image + text encoders and the rating MLP, in the published key layout."""

    def __init__(self, vit: ViTSize, text: dict):
        super().__init__()
        self.blip = Blip(vit, text)
        self.mlp = RatingMLP(text["hidden_size"])

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S], token ids / mask [B, L] -> raw MLP output [B] (before standardising)."""
        image_embeds = self.blip.visual_encoder(pixels)  # [B, N+1, 1024]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.blip.text_encoder(
            input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, return_dict=True,
        )  # fmt: skip
        return self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)  # [B]


def standardise(raw: torch.Tensor) -> torch.Tensor:
    """The published normalisation of the MLP output: (raw - 0.16717) / 1.03334."""
    return (raw - SCORE_MEAN) / SCORE_STD


def text_config(config: Config) -> dict:
    """BERT dims from med_config.json when given, else the built-in values for `config.size`."""
    if config.med_config is None:
        return dict(MED_CONFIG_FULL if config.size == "full" else MED_CONFIG_TINY)
    path = require_file(config.med_config, "ImageReward med_config.json", f"{HUB}, file med_config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in MED_CONFIG_FULL if k not in data]
    if missing:
        raise CheckpointError(f"{path}: med_config lacks keys {missing}")
    return {k: data[k] for k in MED_CONFIG_FULL}


def load_tokenizer(vocab_dir: str, vocab_size: int) -> BertTokenizer:
    """bert-base-uncased WordPiece from `vocab_dir`/vocab.txt plus [DEC] (bos) and [ENC], as BLIP adds them."""
    vocab = require_file(Path(vocab_dir) / "vocab.txt", "BERT uncased vocab.txt", VOCAB_SOURCE)
    tokenizer = BertTokenizer(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise CheckpointError(
            f"{vocab}: {len(tokenizer) - 2} tokens + [DEC] + [ENC] = {len(tokenizer)}, but the text encoder "
            f"expects vocab_size {vocab_size} (bert-base-uncased has 30522)"
        )
    return tokenizer


def build_model(config: Config) -> ImageRewardModel:
    """The architecture for `config` (weights: seeded random, or the checkpoint when init is checkpoint)."""
    vit = VIT_FULL if config.size == "full" else VIT_TINY
    with seeded_init():
        model = ImageRewardModel(vit, text_config(config))
    if config.init == "checkpoint":
        path = require_file(config.checkpoint, "ImageReward checkpoint", f"{HUB}, file ImageReward.pt")
        load_exact(model, read_state_dict(path, "ImageReward checkpoint"), str(path), PUBLISHED_UNUSED_KEYS)
    return model


class ImageReward:
    """ImageReward score of each (image, prompt): standardised MLP output, about N(0, 1) on its data."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizer, image_size: int, max_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.image_size, self.max_length = image_size, max_length
        self.device, self.dtype = model.mlp.layers[0].weight.device, model.mlp.layers[0].weight.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, 3, S, S]: bicubic resize of the short side, centre crop, CLIP mean/std."""
        crops = [resize_center_crop(im, self.image_size) for im in to_pil(images)]
        return normalize(crops, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        pixels = self.preprocess(images).to(self.device, self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        raw = self.model(pixels, tokens.input_ids, tokens.attention_mask).float().cpu()  # [B]
        return RewardOutput(scores=standardise(raw), components={"raw": raw})


def build(config: Config, device: torch.device, dtype: torch.dtype) -> ImageReward:
    """The ImageReward reward on `device` in `dtype` (tokenizer checked before weights load)."""
    tokenizer = load_tokenizer(config.vocab_dir, text_config(config)["vocab_size"])  # cheap checks first
    model = build_model(config)
    image_size = (VIT_FULL if config.size == "full" else VIT_TINY).image_size
    return ImageReward(finish_model(model, device, dtype), tokenizer, image_size, config.max_length)
