"""Sequence building exactly as published.

Text-to-image prompt row: [left pads] caption tokens  <|image_area|> "h*w"  <|begin_of_image|>
then h*w image tokens (placeholders, embedded by image_in_projector) and <|end_of_image|>.
With CFG the rows are [cond | uncond]; the uncond caption is the negative prompt ("" by default).
Position ids are cache positions: they count left padding (RoPE is relative, so a prompt's result
does not depend on how much padding the batch adds, up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from base_model.tokenizer import IMAGE_AREA_TOKEN, SpecialIds

DOWN_FACTOR = 16  # pixels per image token side: VAE 8x times the 2x2 patch


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [R, L] long, left padded; R = B, or 2B ordered [cond | uncond]
    attention_mask: torch.Tensor  # [R, L] bool, False on left padding
    num_prompts: int  # B
    grid_hw: tuple[int, int]  # image tokens per column and row (h, w)
    has_uncond: bool  # rows B..2B are the unconditional branch

    @property
    def num_image_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.num_prompts,
            self.grid_hw, self.has_uncond,
        )  # fmt: skip


def grid_for_size(height: int, width: int) -> tuple[int, int]:
    """Pixel size -> token grid (h, w); both sides must be multiples of 16."""
    if height % DOWN_FACTOR or width % DOWN_FACTOR or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of {DOWN_FACTOR}")
    return height // DOWN_FACTOR, width // DOWN_FACTOR


def image_prefix_ids(tokenizer, ids: SpecialIds, grid_hw: tuple[int, int]) -> list[int]:
    """<|image_area|> + "h*w" + <|begin_of_image|>; the tokenizer's BOS (if any) is dropped."""
    enc = tokenizer(f"{IMAGE_AREA_TOKEN}{grid_hw[0]}*{grid_hw[1]}", add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token is not None and enc and enc[0] == tokenizer.bos_token_id:
        enc = enc[1:]
    return list(enc) + [ids.boi]


def build_prompt_batch(
    tokenizer,
    ids: SpecialIds,
    prompts: list[str],
    image_hw: tuple[int, int],
    with_uncond: bool,
    negative_prompt: str = "",
    max_prompt_tokens: int | None = None,
) -> PromptBatch:
    """Tokenize captions (+ negative prompts), left-pad, append the image prefix. -> PromptBatch."""
    grid = grid_for_size(*image_hw)
    captions = list(prompts) + ([negative_prompt] * len(prompts) if with_uncond else [])
    rows = [tokenizer(c, add_special_tokens=True)["input_ids"] for c in captions]
    if max_prompt_tokens is not None:
        rows = [r[-max_prompt_tokens:] if len(r) > max_prompt_tokens else r for r in rows]
    prefix = image_prefix_ids(tokenizer, ids, grid)
    rows = [r + prefix for r in rows]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), ids.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = True
    return PromptBatch(input_ids, mask, len(prompts), grid, with_uncond)


def append_image_block(batch: PromptBatch, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Finished sequence: prompt + h*w placeholders + <|end_of_image|>. -> ids [R, L+T+1], mask [R, L+T+1]."""
    r, t = batch.input_ids.shape[0], batch.num_image_tokens
    dev = batch.input_ids.device
    block = torch.full((r, t + 1), ids.placeholder, dtype=torch.long, device=dev)
    block[:, -1] = ids.eoi
    input_ids = torch.cat([batch.input_ids, block], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones((r, t + 1), dtype=torch.bool, device=dev)], dim=1)
    return input_ids, mask


def attention_mask_4d(key_valid: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask for SDPA (True = attend).

    key_valid [R, Lk] bool, query_positions [Lq] long -> [R, 1, Lq, Lk] bool. Each query also sees
    itself, so padding rows never have an all-masked row (which would give NaN in SDPA).
    """
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = keys[None, :] <= query_positions[:, None]  # [Lq, Lk]
    self_pos = keys[None, :] == query_positions[:, None]
    return ((causal[None] & key_valid[:, None, :]) | self_pos[None])[:, None]
