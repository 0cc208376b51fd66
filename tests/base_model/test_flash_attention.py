"""`sampling.attention: flash` on a CPU: the wiring to flash-attn's `flash_attn_with_kvcache`, checked
with a pure-torch stand-in that implements that function's documented semantics (flash-attn 2.6
docstring: keys [cache_leftpad, cache_seqlens) per row, causal mask aligned to the bottom right, query
head h reads kv head h // (Hq / Hkv), an all-masked query row gives zeros), injected in place of the
package. The real kernel against grouped SDPA runs in tests/gpu/test_flash_attention.py."""

import dataclasses
import types

import pytest
import torch
from torch._dynamo.utils import counters

import base_model.cuda_graphs as cuda_graphs
import base_model.flash_attention as flash
from base_model.checkpoint import build_random
from base_model.cuda_graphs import release_runners, sample_tokens_static
from base_model.sampler import SamplingConfig, sample_tokens
from base_model.sequence import append_image_block, attention_mask_4d, build_prompt_batch
from core.errors import ConfigError

SMALL = SamplingConfig(image_size=32, cfg_scale=3.0, num_head_steps=6)  # 4 image tokens
PROMPTS = ["a red circle", "a much longer caption that forces extra left padding", "x"]


def standin_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_leftpad=None,
                         softmax_scale=None, causal=False, **unused):  # fmt: skip
    """q [B, Lq, Hq, D]; caches [B, Lc, Hkv, D] -> out [B, Lq, Hq, D], as documented (no in-place append here)."""
    assert k is None and v is None and not unused, "the sampler writes the cache itself"
    assert cache_seqlens.dtype == torch.int32 and (cache_leftpad is None or cache_leftpad.dtype == torch.int32)
    b, lq, hq, d = q.shape
    lc, hkv = k_cache.shape[1], k_cache.shape[2]
    keys = torch.arange(lc)[None, None, :]  # [1, 1, Lc]
    start = torch.zeros(b, dtype=torch.int32) if cache_leftpad is None else cache_leftpad
    allowed = (keys >= start[:, None, None]) & (keys < cache_seqlens[:, None, None])  # [B, 1, Lc]
    if causal:  # query i sits at seqlen - Lq + i
        allowed = allowed & (keys <= (cache_seqlens[:, None] - lq + torch.arange(lq)[None])[..., None])
    kk = k_cache.repeat_interleave(hq // hkv, dim=2)  # [B, Lc, Hq, D]
    vv = v_cache.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * (softmax_scale or d**-0.5)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


@pytest.fixture
def standin(monkeypatch):
    """flash_attn replaced by the stand-in; CPU and fp32 let through (the stand-in takes them)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return standin_with_kvcache(*args, **kwargs)

    module = types.SimpleNamespace(flash_attn_with_kvcache=counted)
    monkeypatch.setattr(flash, "flash_module", lambda: module)
    monkeypatch.setattr(flash, "FLASH_DTYPES", (torch.float32,))
    real = flash.check_flash  # still checked, as if on a GPU

    def as_if_on_cuda(device, dtype, self_cot=False):
        real(torch.device("cuda"), dtype, self_cot)

    monkeypatch.setattr(flash, "check_flash", as_if_on_cuda)
    return calls  # one entry per attention call through the stand-in


def test_kv_bounds_read_the_left_padding_and_the_last_query_position():
    valid = torch.tensor([[False, False, True, True, True, True, True, True],
                          [True, True, True, True, True, True, True, True]])  # fmt: skip
    mask = attention_mask_4d(valid, torch.tensor([4, 5]))  # queries at positions 4, 5 of an 8-slot cache
    leftpad, seqlens = flash.kv_bounds(mask)
    assert leftpad.tolist() == [2, 0] and seqlens.tolist() == [6, 6]
    assert leftpad.dtype == seqlens.dtype == torch.int32


def test_the_standin_follows_the_documented_bottom_right_causal_mask():
    # seqlen_q 2, seqlen_k 5: query 0 sees keys 0..3, query 1 keys 0..4 (the docstring's example)
    q = torch.zeros(1, 2, 1, 1)  # zero scores: uniform weights over the allowed keys
    v = torch.arange(5.0).reshape(1, 5, 1, 1)
    out = standin_with_kvcache(q, torch.zeros(1, 5, 1, 1), v, cache_seqlens=torch.tensor([5], dtype=torch.int32),
                               causal=True)  # fmt: skip
    assert out.flatten().tolist() == [1.5, 2.0]  # mean(0..3), mean(0..4)
    left = standin_with_kvcache(q, torch.zeros(1, 5, 1, 1), v, cache_seqlens=torch.tensor([5], dtype=torch.int32),
                                cache_leftpad=torch.tensor([4], dtype=torch.int32), causal=True)  # fmt: skip
    assert left.flatten().tolist() == [0.0, 4.0]  # query 0's only key (3) is padding: zeros


def sharp(preset: str):
    bundle = build_random(preset, seed=0)
    bundle.model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    return bundle


@pytest.mark.parametrize("preset", ["tiny", "mid"])
def test_flash_path_equals_grouped_sdpa_on_a_left_padded_cfg_batch(standin, preset):
    bundle = sharp(preset)
    model = bundle.model
    batch = build_prompt_batch(
        bundle.tokenizer, bundle.ids, PROMPTS, (64, 64), with_uncond=True, negative_prompt="blur"
    )
    full_ids, full_mask = append_image_block(batch, bundle.ids)
    img = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    img = torch.cat([img, img])
    with torch.no_grad():
        ref = model.forward_sequence(full_ids, full_mask, img)
        with flash.sampling_attention(model, "flash"):
            assert model.config._attn_implementation == flash.FLASH_KVCACHE
            ours = model.forward_sequence(full_ids, full_mask, img)
    assert model.config._attn_implementation != flash.FLASH_KVCACHE  # restored: training never meets it
    torch.testing.assert_close(ours[full_mask], ref[full_mask], atol=1e-5, rtol=1e-5)
    assert (ref[0] - ref[3])[full_mask[0]].abs().max() > 1e-2  # cond and uncond rows differ: not trivial


@pytest.mark.parametrize("loop", ["reference", "static"])
def test_sampling_with_flash_equals_grouped_sdpa(standin, loop):
    bundle = build_random("tiny", seed=0)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS, (32, 32), with_uncond=True)
    seeds = torch.tensor([5, 6, 7])
    fn = sample_tokens if loop == "reference" else sample_tokens_static
    ref = fn(bundle.model, batch, seeds, SMALL, record_chains=True)
    assert not standin
    ours = fn(bundle.model, batch, seeds, dataclasses.replace(SMALL, attention="flash"), record_chains=True)
    release_runners(bundle.model)
    assert len(standin) == 2 * 4  # 2 layers x (prompt pass + 3 decode steps): every attention call
    torch.testing.assert_close(ours.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.log_probs, ref.log_probs, atol=1e-4, rtol=1e-5)


def test_flash_that_cannot_run_here_is_one_config_error(monkeypatch):
    tiny = build_random("tiny", seed=0)
    batch = build_prompt_batch(tiny.tokenizer, tiny.ids, PROMPTS[:1], (32, 32), with_uncond=True)
    settings = dataclasses.replace(SMALL, attention="flash")
    with pytest.raises(ConfigError, match="flash needs a CUDA device"):
        sample_tokens(tiny.model, batch, torch.tensor([1]), settings)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        flash.check_flash(cuda, torch.float32)
    with pytest.raises(ConfigError, match="Self-CoT"):
        flash.check_flash(cuda, bf16, self_cot=True)

    def missing():
        raise ImportError("No module named 'flash_attn'")

    monkeypatch.setattr(flash, "flash_module", missing)
    with pytest.raises(ConfigError, match="flash_attn is not importable"):
        flash.check_flash(cuda, bf16)
    assert tiny.model.config._attn_implementation != flash.FLASH_KVCACHE


def test_compiled_loop_keeps_flash_as_one_op_in_its_two_graphs(standin, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "COMPILE_BACKEND", "aot_eager")  # tracing only (inductor: test_sampler_compile)
    torch._dynamo.reset()
    counters.clear()
    bundle = build_random("tiny", seed=0)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS, (32, 32), with_uncond=True)
    seeds = torch.tensor([5, 6, 7])
    settings = dataclasses.replace(SMALL, attention="flash")
    eager = sample_tokens_static(bundle.model, batch, seeds, settings, record_chains=True)
    compiled = sample_tokens_static(bundle.model, batch, seeds, dataclasses.replace(settings, compile=True),
                                    record_chains=True)  # fmt: skip
    release_runners(bundle.model)
    torch._dynamo.reset()
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(compiled.log_probs, eager.log_probs)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # the custom op: no breaks


def test_a_rollout_worker_asked_for_flash_on_a_cpu_refuses_before_loading_weights(monkeypatch):
    """The kernel cannot run on a CPU: one ConfigError from the worker's constructor, before any weights load."""
    import rollout.worker as worker_module
    from rollout.worker import RolloutWorker

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the attention was checked")

    monkeypatch.setattr(worker_module, "resolve_model", no_load)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        RolloutWorker("tiny", SamplingConfig(attention="flash"), device="cpu", dtype="bfloat16")


@pytest.mark.parametrize(
    "job, path, extra",
    [
        ("build-prefs", "configs/prefs/tiny.yaml", []),
        ("evaluate", "configs/evaluate/tiny.yaml", []),
        ("grpo", "configs/grpo/tiny.yaml", []),
        ("grpo", "configs/grpo/tiny.yaml", ["rollout.device=cuda", "rollout.pool.num_gpus_per_worker=1"]),
    ],
)
def test_a_job_asking_flash_of_workers_that_cannot_run_it_is_refused_at_load(job, path, extra):
    """The rollout workers' device and dtype are in the config: flash on a CPU, or in fp32, is one line when the
    config loads, before a run directory exists."""
    from alignment.grpo_config import GrpoConfig
    from core.schema import load_config
    from jobs.build_prefs import BuildPrefsConfig
    from jobs.evaluate import EvaluateConfig

    cls = {"build-prefs": BuildPrefsConfig, "evaluate": EvaluateConfig, "grpo": GrpoConfig}[job]
    why = "needs bf16 or fp16 weights" if extra else "needs a CUDA device"
    with pytest.raises(ConfigError, match=f"sampling.attention: flash {why}"):
        load_config(cls, path, ["sampling.attention=flash", *extra])
    load_config(cls, path, ["sampling.attention=flash", "rollout.device=cuda", "rollout.dtype=bfloat16",
                            "rollout.pool.num_gpus_per_worker=1"])  # fmt: skip
