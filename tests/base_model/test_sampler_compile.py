"""`sampling.compile` on a CPU: the compiled static loop gives the eager loop's tokens, compiles twice
(head net, decode step) per batch shape and never per image token, and `sample_prompts` routes to it.

The fast tests compile with the aot_eager backend (dynamo's tracing and AOT autograd, no code
generation), which must be bit-equal to eager; the slow one runs inductor, the backend users get."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import base_model.cuda_graphs as cuda_graphs
from base_model.checkpoint import build_random
from base_model.cuda_graphs import release_runners, sample_tokens_static
from base_model.generate import sample_prompts
from base_model.sampler import SamplingConfig
from base_model.sequence import build_prompt_batch
from core.errors import ConfigError

SMALL = SamplingConfig(image_size=32, cfg_scale=3.0, num_head_steps=6)  # 4 image tokens
PROMPTS = ["a red circle", "a much longer caption that forces extra left padding", "x"]


@pytest.fixture
def fresh_dynamo():
    """Empty compile caches and counters, so that compiles are counted from zero."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch, fresh_dynamo):
    monkeypatch.setattr(cuda_graphs, "COMPILE_BACKEND", "aot_eager")


def run_both(bundle, settings: SamplingConfig, prompts=PROMPTS):
    size = (settings.image_size, settings.image_size)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, prompts, size, with_uncond=settings.uses_guidance)
    seeds = torch.arange(5, 5 + len(prompts))
    eager = sample_tokens_static(bundle.model, batch, seeds, settings, record_chains=True)
    compiled = sample_tokens_static(bundle.model, batch, seeds, dataclasses.replace(settings, compile=True),
                                    record_chains=True)  # fmt: skip
    release_runners(bundle.model)
    return eager, compiled


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "settings",
    [SMALL, SamplingConfig(image_size=48, cfg_scale=1.0, num_head_steps=4, sde_kind="cps", noise="published",
                           time_grid="final_euler")],
    ids=["cfg-sde", "nocfg-cps-published-final-euler"],
)  # fmt: skip
def test_traced_loop_equals_the_eager_one_bit_for_bit_in_two_graphs(aot_eager, settings):
    eager, compiled = run_both(build_random("tiny", seed=0), settings)
    for name in ("tokens", "chains", "log_probs"):
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
    assert graphs_compiled() == 2  # the head net (all K steps, all tokens) and the decode step
    assert not counters["graph_break"]  # each is one whole graph


def test_compiles_happen_per_batch_shape_never_per_token(aot_eager):
    tiny = build_random("tiny", seed=0)
    settings = dataclasses.replace(SMALL, compile=True)

    def sample(prompts, size=32, steps=2):
        batch = build_prompt_batch(tiny.tokenizer, tiny.ids, prompts, (size, size), with_uncond=True)
        sample_tokens_static(tiny.model, batch, torch.arange(len(prompts)),
                             dataclasses.replace(settings, image_size=size, num_head_steps=steps))  # fmt: skip

    sample(PROMPTS)
    assert graphs_compiled() == 2
    sample(["two blue squares", "y", "z"])  # other prompts, same shapes: the compiled graphs run again
    sample(PROMPTS, steps=3)  # a new runner (other K), same shapes: the head net's graph serves any K
    assert graphs_compiled() == 2
    sample(PROMPTS, size=48)  # 9 image tokens: a longer cache, so the decode step compiles once more
    assert graphs_compiled() == 3
    release_runners(tiny.model)


def test_sample_prompts_runs_the_compiled_static_loop_on_a_cpu(aot_eager):
    tiny = build_random("tiny", seed=0)
    settings = dataclasses.replace(SMALL, compile=True)
    via_prompts = sample_prompts(tiny, PROMPTS[:2], [1, 2], settings).tokens
    assert graphs_compiled() == 2  # it went through the compiled runner
    batch = build_prompt_batch(tiny.tokenizer, tiny.ids, PROMPTS[:2], (32, 32), with_uncond=True)
    eager = sample_tokens_static(tiny.model, batch, torch.tensor([1, 2]), SMALL, cache_len_multiple=64).tokens
    assert torch.equal(via_prompts, eager)
    release_runners(tiny.model)


def test_compile_with_self_cot_is_a_config_error():
    with pytest.raises(ConfigError, match="sampling.compile"):
        SamplingConfig(compile=True, self_cot=True).validate()


@pytest.mark.slow  # inductor generates and builds C++ kernels: ~10 s warm, a minute or more on a cold cache
def test_inductor_loop_equals_the_eager_one_up_to_float_rounding(fresh_dynamo):
    eager, compiled = run_both(build_random("tiny", seed=0), SMALL)
    assert graphs_compiled() == 2
    # inductor's fused kernels (vectorised exp / rsqrt, its own reduction order in the norms) round
    # differently from ATen's: measured 5e-7 on the tokens, 8e-6 on the summed 64-d log-probs
    torch.testing.assert_close(compiled.tokens, eager.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.chains, eager.chains, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=1e-4, rtol=1e-5)
    assert not torch.equal(compiled.tokens, torch.zeros_like(compiled.tokens))
