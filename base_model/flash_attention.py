"""`sampling.attention: flash`: the sampler's attention through flash-attn's `flash_attn_with_kvcache`.

flash-attn takes no 4-D mask, but the sampler's masks (base_model/sequence.py:attention_mask_4d) are,
for image-only batches, one contiguous run of valid keys per row: [left padding | prompt | image tokens
so far], causal. Each row is therefore two integers, `cache_leftpad` (its first valid key) and
`cache_seqlens` (one past its last query), read from the mask's last query row on the device (no host
sync, static shapes: CUDA graphs can capture it). `flash_attn_with_kvcache` reads the preallocated cache
in place (GQA native: no repeat_kv), for the prompt pass (Lq > 1, causal, bottom-right aligned) and
each decode step alike. The cache is written by KVCache.update before the call, as for SDPA.

Sampling only: the kernel has no backward, so training passes keep grouped SDPA. Self-CoT batches leave
holes in their rows (reasoning of different lengths), which two integers cannot describe: refused.
A request that cannot run here (no flash_attn, a CPU model, fp32 weights) is a ConfigError when
sampling starts, never a silent fallback: a user who asked for flash on 64 GPUs should learn at the
first batch, in one line, that it is not what runs, rather than find a slower job with other numerics.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface

from core.errors import ConfigError

AttentionKind = Literal["grouped_sdpa", "flash"]
FLASH_KVCACHE = "nextstep_kvcache_fa2"  # our attention function's name in transformers' registry
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # the only dtypes flash-attn's kernels take


def kv_bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid keys as [leftpad, seqlen), read from the last query row.

    mask [R, 1, Lq, Lk] bool (attention_mask_4d: causal & padding) -> (leftpad [R] int32, seqlens [R] int32).
    argmax returns the first maximal index, so leftpad is the first True key and Lk - (first True of the
    reversed row) is one past the last: the last query's own position + 1.
    """
    row = mask[:, 0, -1].to(torch.int32)  # [R, Lk]
    leftpad = row.argmax(dim=-1).to(torch.int32)
    seqlens = (row.shape[-1] - row.flip(-1).argmax(dim=-1)).to(torch.int32)
    return leftpad, seqlens


def flash_module():
    """flash_attn, imported when first used (a heavy optional dependency: the `[gpu]` extra)."""
    return importlib.import_module("flash_attn")


def flash_kvcache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [R, Hq, Lq, D]; key, value [R, Hkv, Lk, D] (the cache, read in place through a transposed
    view: flash-attn needs only the head dim contiguous); attention_mask [R, 1, Lq, Lk'] bool
    (Lk' >= Lk) -> (out [R, Lq, Hq, D], None). Query head h reads kv head h // (Hq / Hkv), as repeat_kv."""
    lk = key.shape[2]
    leftpad, seqlens = (None, None) if attention_mask is None else kv_bounds(attention_mask[..., :lk])
    if seqlens is None:
        seqlens = torch.full((key.shape[0],), lk, dtype=torch.int32, device=key.device)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = flash_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), seqlens, leftpad, scale)
    return out, None


@torch.library.custom_op("nextstep::flash_kvcache", mutates_args=())
def flash_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    leftpad: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """flash_attn_with_kvcache (causal, cache read only) as one opaque op: torch.compile (sampling.compile)
    keeps it in its graph instead of breaking the decode step at every layer.
    q [R, Lq, Hq, D]; k_cache, v_cache [R, Lk, Hkv, D] -> [R, Lq, Hq, D] contiguous."""
    out = flash_module().flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=leftpad, softmax_scale=scale, causal=True
    )
    return out.contiguous()


@flash_kvcache.register_fake
def _(q, k_cache, v_cache, seqlens, leftpad, scale):
    return q.new_empty(q.shape)  # contiguous, as the real op returns


AttentionInterface.register(FLASH_KVCACHE, flash_kvcache_attention)


def placement_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash cannot run for a model on `device` in `dtype`, or None (known from the settings alone, so a
    job's config checks it at load, before anything is written: RolloutConfig.check_attention)."""
    if device.type != "cuda":
        return f"needs a CUDA device, the model is on {device}"
    if dtype not in FLASH_DTYPES:
        return f"needs bf16 or fp16 weights, the model is {dtype}"
    return None


def check_flash(device: torch.device, dtype: torch.dtype, self_cot: bool = False) -> None:
    """One ConfigError naming why `sampling.attention: flash` cannot run for this model, or nothing."""
    where = "sampling.attention: flash"
    if self_cot:
        raise ConfigError(f"{where} does not take Self-CoT batches (rows with holes); use grouped_sdpa")
    if problem := placement_problem(device, dtype):
        raise ConfigError(f"{where} {problem}")
    try:
        flash_module()
    except ImportError as e:
        raise ConfigError(f'{where}: flash_attn is not importable ({e}); pip install -e ".[gpu]"') from e


@contextmanager
def sampling_attention(model: nn.Module, kind: AttentionKind, self_cot: bool = False) -> Iterator[None]:
    """Run the body with the sampler's attention: grouped SDPA (the model's own choice, unchanged) or flash.

    Every decoder layer reads the shared config at call time, so this switches all of them; the old
    choice comes back afterwards (a training pass must not meet a kernel without backward)."""
    if kind == "grouped_sdpa":
        yield
        return
    check_flash(model.device, model.dtype, self_cot)
    old = model.config._attn_implementation
    model.config._attn_implementation = FLASH_KVCACHE
    try:
        yield
    finally:
        model.config._attn_implementation = old


def with_sampling_attention(sampler: Callable) -> Callable:
    """A sampler `f(model, batch, seeds, config, ...)` run under `sampling_attention` with the attention its
    config names (a Self-CoT batch, `batch.image_prefix` set, is named to the check)."""

    @functools.wraps(sampler)
    def run(model: nn.Module, batch, seeds: torch.Tensor, config, *args, **kwargs):
        with sampling_attention(model, config.attention, self_cot=batch.image_prefix is not None):
            return sampler(model, batch, seeds, config, *args, **kwargs)

    return run
