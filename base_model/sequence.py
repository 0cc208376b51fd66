"""Sequence building exactly as published.

Text-to-image prompt row: [left pads] caption tokens  <|image_area|> "h*w"  <|begin_of_image|>
then h*w image tokens (placeholders, embedded by image_in_projector) and <|end_of_image|>.
With CFG the rows are [cond | uncond]; the uncond caption is the negative prompt ("" by default).
Position ids are cache positions: they count left padding (RoPE is relative, so a prompt's result
does not depend on how much padding the batch adds, up to float rounding).

Prompt length policy (every job): a caption longer than `max_prompt_tokens` tokens is TRUNCATED to its
first `max_prompt_tokens` tokens (counted with the tokenizer's special tokens), never refused, because
one long prompt in a 20K-prompt file should not stop a run. Each job reports the count once at start
(`truncation_note`), and refuses at validation a `max_prompt_tokens` that cannot fit the model's
positions together with the image block (`check_sequence_fits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from base_model.config import PRESETS, RANDOM_PRESETS
from base_model.tokenizer import IMAGE_AREA_TOKEN, SpecialIds, build_tiny_tokenizer, load_tokenizer
from core.errors import ConfigError

DOWN_FACTOR = 16  # pixels per image token side: VAE 8x times the 2x2 patch
# Our choice, not published: far above any real text-to-image caption (CLIP reads 77, T5 in SD3 256)
# and small enough that a pasted essay costs no memory; its worst case fits every preset's positions.
DEFAULT_MAX_PROMPT_TOKENS = 512


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [R, L] long, left padded; R = B, or 2B ordered [cond | uncond]
    attention_mask: torch.Tensor  # [R, L] bool, False on left padding
    num_prompts: int  # B
    grid_hw: tuple[int, int]  # image tokens per column and row (h, w)
    has_uncond: bool  # rows B..2B are the unconditional branch
    # Self-CoT (base_model/text.py). rope_positions [R, L] long: each row's own positions, counting its valid
    # tokens only (None: the cache positions, which count left padding, as published). image_prefix [P]
    # long: the sampler appends it after the reasoning it writes (input_ids stop before it). text_lengths
    # [B] long: a teacher-forcing batch whose cond rows hold a reasoning of that many tokens ending at
    # column text_end (where the image prefix starts)
    rope_positions: torch.Tensor | None = None
    image_prefix: torch.Tensor | None = None
    text_lengths: torch.Tensor | None = None
    text_end: int | None = None
    special: SpecialIds | None = None  # Self-CoT sampler input: the stop and banned text tokens

    @property
    def num_image_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> PromptBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PromptBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.num_prompts,
            self.grid_hw, self.has_uncond, move(self.rope_positions), move(self.image_prefix),
            move(self.text_lengths), self.text_end, self.special,
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
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> PromptBatch:
    """Tokenize captions (+ negative prompts) keeping each one's first `max_prompt_tokens` tokens,
    left-pad, append the image prefix. -> PromptBatch."""
    grid = grid_for_size(*image_hw)
    captions = list(prompts) + ([negative_prompt] * len(prompts) if with_uncond else [])
    rows = [ids_[:max_prompt_tokens] for ids_ in caption_ids(tokenizer, captions)]
    prefix = image_prefix_ids(tokenizer, ids, grid)
    input_ids, mask = left_pad([r + prefix for r in rows], ids.pad)
    return PromptBatch(input_ids, mask, len(prompts), grid, with_uncond)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [R, L] long, mask [R, L] bool), right-aligned on the longest."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r) :] = True
    return input_ids, mask


def row_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each row's own positions: mask [R, L] bool -> [R, L] long, 0 at its first valid token (0 on padding)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def cot_prompt_ids(tokenizer, captions: list[str], cot, max_prompt_tokens: int) -> list[list[int]]:
    """Captions wrapped in the CoT template (text.CotConfig): the text before {caption} (with the tokenizer's
    special tokens), the caption's first `max_prompt_tokens` tokens, the text after it. The pieces are
    tokenized apart, so the sampler and every re-scoring see the same ids whatever the caption."""
    before, after = cot.template_parts
    head = list(tokenizer(before, add_special_tokens=True)["input_ids"])
    tail = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
    body = tokenizer(list(captions), add_special_tokens=False)["input_ids"] if captions else []
    return [head + list(c)[:max_prompt_tokens] + tail for c in body]


def build_self_cot_batch(
    tokenizer,
    ids: SpecialIds,
    prompts: list[str],
    image_hw: tuple[int, int],
    with_uncond: bool,
    cot,
    texts: list[list[int]] | None = None,
    negative_prompt: str = "",
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> PromptBatch:
    """Self-CoT rows with each row's own positions (`row_positions`). texts None: what the sampler starts
    from (cond rows: the CoT-wrapped caption; the image prefix is left in `image_prefix`); texts [B] token
    ids: a finished sequence's rows for teacher forcing (wrapped caption + reasoning + image prefix).
    Unconditional rows are the negative prompt alone, with no reasoning (+ the prefix when texts are given)."""
    grid = grid_for_size(*image_hw)
    rows = cot_prompt_ids(tokenizer, prompts, cot, max_prompt_tokens)
    uncond = [c[:max_prompt_tokens] for c in caption_ids(tokenizer, [negative_prompt] * len(prompts))]
    prefix = image_prefix_ids(tokenizer, ids, grid)
    if texts is None:
        input_ids, mask = left_pad(rows + (uncond if with_uncond else []), ids.pad)
        return PromptBatch(input_ids, mask, len(prompts), grid, with_uncond, row_positions(mask),
                           image_prefix=torch.tensor(prefix, dtype=torch.long), special=ids)  # fmt: skip
    if len(texts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} reasoning texts")
    rows = [r + list(t) + prefix for r, t in zip(rows, texts)]
    input_ids, mask = left_pad(rows + ([u + prefix for u in uncond] if with_uncond else []), ids.pad)
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    return PromptBatch(input_ids, mask, len(prompts), grid, with_uncond, row_positions(mask),
                       text_lengths=lengths, text_end=input_ids.shape[1] - len(prefix))  # fmt: skip


def caption_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    """Token ids of each caption, with the tokenizer's special tokens (BOS when it has one)."""
    return [list(r) for r in tokenizer(list(captions), add_special_tokens=True)["input_ids"]] if captions else []


def truncation_note(job: str, key: str, tokenizer, prompts: list[str], max_prompt_tokens: int) -> str | None:
    """The one line a job prints at start when some prompts exceed `max_prompt_tokens` (None when none do)."""
    lengths = [len(r) for r in caption_ids(tokenizer, prompts)]
    over = [n for n in lengths if n > max_prompt_tokens]
    if not over:
        return None
    return (f"{job}: {len(over)} of {len(prompts)} prompts are longer than {key}={max_prompt_tokens} tokens "
            f"(longest {max(over)}) and are truncated to their first {max_prompt_tokens} tokens")  # fmt: skip


def positions_needed(max_prompt_tokens: int, image_hw: tuple[int, int], text_tokens: int = 0) -> int:
    """Upper bound on the positions of a finished sequence: caption + `text_tokens` (Self-CoT: template and
    reasoning) + <|image_area|> "h*w" <|boi|> + h*w image tokens + <|eoi|>. "h*w" counts one token per
    character (byte-level BPE never needs more)."""
    h, w = grid_for_size(*image_hw)
    return max_prompt_tokens + text_tokens + 1 + len(f"{h}*{w}") + 1 + h * w + 1


def check_sequence_fits(max_prompt_tokens: int, image_hw: tuple[int, int], max_positions: int | None,
                        where: str, text_tokens: int = 0) -> None:  # fmt: skip
    """ConfigError unless `max_prompt_tokens` >= 1 and the longest sequence (with `text_tokens` more for a
    Self-CoT template and reasoning) fits `max_positions` (None: the model is not known yet, only the first
    check runs)."""
    if max_prompt_tokens < 1:
        raise ConfigError(f"{where}: must be >= 1, got {max_prompt_tokens}")
    if max_positions is None:
        return
    need = positions_needed(max_prompt_tokens, image_hw, text_tokens)
    if need > max_positions:
        image = max_positions - (need - max_prompt_tokens)
        smaller = "a smaller image size" + (" or fewer reasoning tokens (cot.max_text_tokens)" if text_tokens else "")
        fix = f"use <= {image}" if image >= 1 else f"use {smaller}"
        raise ConfigError(
            f"{where}: {max_prompt_tokens} prompt tokens + {need - max_prompt_tokens} "
            f"{'reasoning, ' if text_tokens else ''}image and special tokens "
            f"at {image_hw[0]}x{image_hw[1]}px = {need} positions > the model's {max_positions}; {fix}"
        )


def model_max_positions(spec: str) -> int | None:
    """max_position_embeddings of a preset name or a checkpoint directory's config.json; None when the
    directory or its config cannot be read here (loading the model reports that, naming the file)."""
    if spec in RANDOM_PRESETS:
        return PRESETS[spec]["max_position_embeddings"]
    try:
        value = json.loads((Path(spec) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def prompt_tokenizer(spec: str):
    """The tokenizer of a preset (the in-process byte-level one) or a checkpoint directory, without the
    weights: drivers that never load the model use it to count long prompts."""
    return build_tiny_tokenizer() if spec in RANDOM_PRESETS else load_tokenizer(spec)


def append_image_block(batch: PromptBatch, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Finished sequence: prompt + h*w placeholders + <|end_of_image|>. -> ids [R, L+T+1], mask [R, L+T+1]."""
    r, t = batch.input_ids.shape[0], batch.num_image_tokens
    dev = batch.input_ids.device
    block = torch.full((r, t + 1), ids.placeholder, dtype=torch.long, device=dev)
    block[:, -1] = ids.eoi
    input_ids = torch.cat([batch.input_ids, block], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones((r, t + 1), dtype=torch.bool, device=dev)], dim=1)
    return input_ids, mask


def block_rope_positions(batch: PromptBatch) -> torch.Tensor | None:
    """RoPE positions [R, L+T+1] of `append_image_block`'s sequence (None when the batch uses cache positions)."""
    if batch.rope_positions is None:
        return None
    last = batch.rope_positions[:, -1:]  # [R, 1]
    steps = torch.arange(1, batch.num_image_tokens + 2, device=last.device)
    return torch.cat([batch.rope_positions, last + steps], dim=1)


def attention_mask_4d(key_valid: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask for SDPA (True = attend).

    key_valid [R, Lk] bool, query_positions [Lq] long -> [R, 1, Lq, Lk] bool. Each query also sees
    itself, so padding rows never have an all-masked row (which would give NaN in SDPA).
    """
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = keys[None, :] <= query_positions[:, None]  # [Lq, Lk]
    self_pos = keys[None, :] == query_positions[:, None]
    return ((causal[None] & key_valid[:, None, :]) | self_pos[None])[:, None]
