"""The CUDA sampler on a GPU (marked `gpu`; skipped without CUDA): CUDA graphs replay the eager static
loop bit for bit, bf16 weights stay close to fp32, grouped-query SDPA equals repeat_kv attention and
runs on a fused kernel (never the math fallback), and no host sync happens per image token.
Run all of them, then the CUDA benchmark, with `bash bench/gpu_checks.sh`."""

import dataclasses
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from base_model.checkpoint import build_random
from base_model.cuda_graphs import release_runners, sample_tokens_static
from base_model.generate import sample_prompts
from base_model.model import GROUPED_SDPA, KVCache
from base_model.sampler import SamplingConfig, sample_tokens
from base_model.sequence import append_image_block, build_prompt_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["a red circle", "a much longer caption that forces extra left padding", "x", "two blue squares"]
SETTINGS = SamplingConfig(image_size=64, cfg_scale=7.5, num_head_steps=20)


def mid_on_cuda(dtype: torch.dtype):
    """The mid preset (8 layers, GQA 8:2) with weights large enough that attention is not uniform."""
    bundle = build_random("mid", seed=0)
    bundle.model.init_weights(std=0.05, generator=torch.Generator().manual_seed(1))
    bundle.model.place("cuda", dtype)
    return bundle


@pytest.fixture(scope="module")
def fp32():
    return mid_on_cuda(torch.float32)


@pytest.fixture(scope="module")
def bf16():
    return mid_on_cuda(torch.bfloat16)


def batch_of(bundle, prompts=PROMPTS, size=64, uncond=True):
    return build_prompt_batch(bundle.tokenizer, bundle.ids, prompts, (size, size), with_uncond=uncond)


def image_sequence(bundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PROMPTS with CFG and a seeded 16-token image on CUDA, for one teacher-forced pass: (ids [8, L], mask
    [8, L], image tokens [8, 16, 64], the same image for the cond and uncond rows)."""
    full_ids, full_mask = append_image_block(batch_of(bundle).to("cuda"), bundle.ids)
    img = torch.randn(4, 16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    return full_ids, full_mask, torch.cat([img, img])


@pytest.mark.parametrize("noise", ["counter", "published"])
def test_graphs_replay_the_eager_static_loop_exactly(bf16, noise):
    settings = SamplingConfig(image_size=64, cfg_scale=7.5, num_head_steps=20, noise=noise)
    seeds = torch.arange(100, 104)
    eager = sample_tokens_static(bf16.model, batch_of(bf16), seeds, settings, record_chains=True, use_graphs=False)
    graphs = sample_tokens_static(bf16.model, batch_of(bf16), seeds, settings, record_chains=True, use_graphs=True)
    again = sample_tokens_static(bf16.model, batch_of(bf16), seeds, settings, record_chains=True, use_graphs=True)
    for name in ("tokens", "chains", "log_probs"):
        a, b, c = getattr(eager, name), getattr(graphs, name), getattr(again, name)
        assert torch.equal(a, b), f"{name}: graphs differ from eager by {(a - b).abs().max().item()}"
        assert torch.equal(b, c), f"{name}: a second replay differs"
    release_runners(bf16.model)


def test_the_default_cuda_path_is_the_graphed_one(bf16):
    auto = sample_prompts(bf16, PROMPTS, [1, 2, 3, 4], SETTINGS).tokens
    graphs = sample_tokens_static(bf16.model, batch_of(bf16), torch.tensor([1, 2, 3, 4]), SETTINGS, use_graphs=True)
    assert torch.equal(auto, graphs.tokens)
    reference = sample_prompts(bf16, PROMPTS, [1, 2, 3, 4], dataclasses.replace(SETTINGS, cuda_graphs=False)).tokens
    # the reference loop's cache is not rounded up: other attention lengths, so bf16 rounding differs
    assert (reference[:, 0] - auto[:, 0]).abs().max() < 0.1
    assert (reference - auto).abs().mean() < 0.1
    release_runners(bf16.model)


def test_bf16_weights_with_fp32_head_maths_stay_close_to_fp32(fp32, bf16):
    seeds = torch.arange(4)
    a = sample_tokens_static(fp32.model, batch_of(fp32), seeds, SETTINGS, record_chains=True)
    b = sample_tokens_static(bf16.model, batch_of(bf16), seeds, SETTINGS, record_chains=True)
    other = sample_tokens_static(fp32.model, batch_of(fp32), seeds + 50, SETTINGS).tokens
    assert b.tokens.dtype == b.log_probs.dtype == b.chains.dtype == torch.float32  # head maths in fp32
    seed_gap = (other - a.tokens).abs().mean()
    first_gap = (b.tokens[:, 0] - a.tokens[:, 0]).abs().max()  # one prompt pass + one head loop
    mean_gap = (b.tokens - a.tokens).abs().mean()  # 16 tokens fed back: bf16 rounding compounds
    assert first_gap < 0.1, first_gap
    assert mean_gap < 0.1 * seed_gap, (mean_gap, seed_gap)
    torch.testing.assert_close(b.log_probs.mean(), a.log_probs.mean(), atol=0.5, rtol=0.02)
    release_runners(fp32.model)
    release_runners(bf16.model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_sdpa_equals_repeat_kv_attention_and_needs_no_math_fallback(fp32, bf16, dtype):
    bundle = fp32 if dtype == torch.float32 else bf16
    model = bundle.model
    full_ids, full_mask, img = image_sequence(bundle)
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            ours = model.forward_sequence(full_ids, full_mask, img)  # raises if only the math kernel could run
            cache = KVCache(model.config, full_ids.shape[0], full_ids.shape[1], model.dtype, "cuda")
            pos = torch.arange(full_ids.shape[1], device="cuda")
            model.backbone(model.embed(full_ids[:, :-2], img), full_mask, pos[:-2], cache)
            emb = model.embed(full_ids[:, -2:-1], img[:, -1:])
            step = model.backbone(emb, full_mask, pos[-2:-1], cache)  # one decode step over the whole cache
        model.config._attn_implementation = "sdpa"  # transformers' path: repeat_kv, then SDPA
        try:
            ref = model.forward_sequence(full_ids, full_mask, img)
        finally:
            model.config._attn_implementation = GROUPED_SDPA
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(ours[full_mask], ref[full_mask], **tol)
    torch.testing.assert_close(step[:, 0], ref[:, -2], **tol)


def sample_once(loop: str, bundle, size: int) -> None:
    settings = SamplingConfig(image_size=size, cfg_scale=7.5, num_head_steps=10)
    batch, seeds = batch_of(bundle, PROMPTS[:2], size), torch.tensor([1, 2])
    if loop == "graphs":
        sample_tokens_static(bundle.model, batch, seeds, settings, use_graphs=True)
    else:
        sample_tokens(bundle.model, batch, seeds, settings)


def syncs_in(loop: str, bundle, size: int) -> int:
    """Synchronizing CUDA calls in one warm call, as torch.cuda's sync debug mode reports them."""
    sample_once(loop, bundle, size)  # capture (graphs) and warm-up outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sample_once(loop, bundle, size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_sync_per_image_token():
    models = {32: mid_on_cuda(torch.bfloat16), 64: mid_on_cuda(torch.bfloat16)}  # one kept runner per model
    for loop in ("graphs", "reference"):
        counts = {size: syncs_in(loop, bundle, size) for size, bundle in models.items()}
        assert counts[32] == counts[64], (loop, counts)  # 4 vs 16 image tokens: nothing per token
        assert counts[64] <= 8, (loop, counts)  # the batch's host-to-device copies only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        torch.ones(2, device="cuda").sum().item()
        torch.cuda.set_sync_debug_mode("default")
    assert any("synchroniz" in str(w.message) for w in caught)  # the detector sees a sync
    for bundle in models.values():
        release_runners(bundle.model)
