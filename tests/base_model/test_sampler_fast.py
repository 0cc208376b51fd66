"""The CUDA-fast sampler's parts on a CPU: grouped-query attention without repeat_kv, the static-shape
loop that CUDA graphs replay (same tokens as the reference loop), runner reuse, and no host read
per image token."""

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from base_model.checkpoint import build_random
from base_model.cuda_graphs import _RUNNERS, release_runners, sample_tokens_static, use_cuda_graphs
from base_model.generate import sample_prompts
from base_model.model import GROUPED_SDPA, grouped_sdpa_attention
from base_model.sampler import SamplingConfig, sample_tokens
from base_model.sequence import append_image_block, build_prompt_batch
from core.errors import ConfigError

SMALL = SamplingConfig(image_size=32, cfg_scale=3.0, num_head_steps=6)  # 4 image tokens
PROMPTS = ["a red circle", "a much longer caption that forces extra left padding", "x"]


def sharp(preset: str):
    """A random bundle with weights large enough that attention is far from uniform."""
    bundle = build_random(preset, seed=0)
    bundle.model.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    return bundle


@pytest.fixture(scope="module", params=["tiny", "mid"])
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def bundle(preset):
    """The preset's own random init: sampled tokens fed back through it do not amplify float rounding
    (with sharp weights 16 fed-back tokens turn a 1e-7 kernel difference into O(0.1))."""
    return build_random(preset, seed=0)


@contextmanager
def attention(model, name: str):
    old = model.config._attn_implementation
    model.config._attn_implementation = name  # every layer reads the shared config at call time
    try:
        yield
    finally:
        model.config._attn_implementation = old


def test_grouped_attention_equals_a_hand_written_per_head_softmax():
    # q heads 0,1 read kv head 0, q heads 2,3 kv head 1 (repeat_kv's order); key 1 is masked out
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]).reshape(1, 4, 1, 2)  # [R, Hq, Lq, D]
    k = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 0.0]], [[0.0, 1.0], [9.0, 9.0], [1.0, 1.0]]])[None]  # [1, 2, 3, 2]
    v = torch.tensor([[[1.0, 2.0], [7.0, 7.0], [3.0, 4.0]], [[0.0, 1.0], [7.0, 7.0], [2.0, 0.0]]])[None]
    mask = torch.tensor([True, False, True]).reshape(1, 1, 1, 3)
    out, _ = grouped_sdpa_attention(None, q, k, v, mask, scaling=1.0)  # [1, 1, 4, 2]
    expected = []
    for h in range(4):
        kv = h // 2
        s = torch.stack([q[0, h, 0] @ k[0, kv, 0], q[0, h, 0] @ k[0, kv, 2]])  # keys 0 and 2
        p = torch.softmax(s, dim=0)
        expected.append(p[0] * v[0, kv, 0] + p[1] * v[0, kv, 2])
    # head 0: scores (0, 1) -> weights (1/(1+e), e/(1+e)) over values (1,2), (3,4)
    e = torch.e
    torch.testing.assert_close(expected[0], torch.tensor([1 + 2 * e / (1 + e), 2 + 2 * e / (1 + e)]))
    torch.testing.assert_close(out[0, 0], torch.stack(expected), atol=1e-6, rtol=1e-6)


def test_grouped_attention_is_the_default_and_eager_or_sdpa_stay_selectable():
    assert build_random("tiny").model.config._attn_implementation == GROUPED_SDPA
    assert build_random("tiny", overrides={"attn_implementation": "eager"}).model.config._attn_implementation == "eager"


def test_grouped_attention_equals_repeat_kv_on_a_left_padded_cfg_batch(preset):
    bundle = sharp(preset)
    model, ids = bundle.model, bundle.ids
    batch = build_prompt_batch(bundle.tokenizer, ids, PROMPTS, (64, 64), with_uncond=True, negative_prompt="blur")
    full_ids, full_mask = append_image_block(batch, ids)
    img = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    img = torch.cat([img, img])  # both CFG branches see the same tokens
    outs = {}
    with torch.no_grad():
        for name in (GROUPED_SDPA, "sdpa", "eager"):
            with attention(model, name):
                h = model.forward_sequence(full_ids, full_mask, img)
                outs[name] = (h, model.lm_head(h))
    valid = full_mask  # padded positions are never read
    # the same SDPA kernel family: equal up to its blocking; eager (matmul, softmax) sums in another order
    for name, tol in (("sdpa", 1e-5), ("eager", 1e-4)):
        torch.testing.assert_close(outs[GROUPED_SDPA][0][valid], outs[name][0][valid], atol=tol, rtol=tol)
        torch.testing.assert_close(outs[GROUPED_SDPA][1][valid], outs[name][1][valid], atol=tol, rtol=tol)
    spread = (outs["sdpa"][1][0] - outs["sdpa"][1][3]).abs().max()  # cond vs uncond rows differ: not trivial
    assert spread > 1e-2


def test_sampled_tokens_and_logprobs_equal_with_either_attention(bundle):
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS, (48, 48), with_uncond=True)
    seeds = torch.tensor([11, 22, 33])
    with attention(bundle.model, "sdpa"):
        old = sample_tokens(bundle.model, batch, seeds, SMALL, record_chains=True)
    new = sample_tokens(bundle.model, batch, seeds, SMALL, record_chains=True)
    torch.testing.assert_close(new.tokens, old.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.log_probs, old.log_probs, atol=1e-4, rtol=1e-5)


def test_static_loop_equals_the_reference_loop_exactly(bundle):
    check_static_equals_reference(bundle, SMALL)


@pytest.mark.parametrize(
    "settings",
    [SamplingConfig(image_size=32, cfg_scale=1.0, num_head_steps=4, sde_kind="cps", use_norm=False),
     SamplingConfig(image_size=48, cfg_scale=7.5, num_head_steps=5, time_grid="final_euler", noise="published")],
    ids=["cps-nocfg", "published-final-euler"],
)  # fmt: skip
def test_static_loop_equals_the_reference_loop_for_every_sampler_setting(settings):
    check_static_equals_reference(build_random("tiny", seed=0), settings)


def check_static_equals_reference(bundle, settings: SamplingConfig) -> None:
    size = (settings.image_size, settings.image_size)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS, size, with_uncond=settings.uses_guidance)
    seeds = torch.tensor([5, 6, 7])
    ref = sample_tokens(bundle.model, batch, seeds, settings, record_chains=True)
    # cache of the reference's length: the very same kernels, bit for bit
    same = sample_tokens_static(bundle.model, batch, seeds, settings, record_chains=True, cache_len_multiple=1)
    assert torch.equal(same.tokens, ref.tokens) and torch.equal(same.chains, ref.chains)
    assert torch.equal(same.log_probs, ref.log_probs)
    # rounded cache (as on CUDA): attention over extra, causally masked slots moves only float rounding
    rounded = sample_tokens_static(bundle.model, batch, seeds, settings, record_chains=True)
    torch.testing.assert_close(rounded.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rounded.log_probs, ref.log_probs, atol=1e-4, rtol=1e-5)
    release_runners(bundle.model)


def test_static_loop_continues_a_given_prefix_like_the_reference():
    bundle = build_random("tiny", seed=0)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS[:2], (32, 32), with_uncond=True)
    seeds = torch.tensor([7, 8])
    full = sample_tokens(bundle.model, batch, seeds, SMALL).tokens
    other = torch.tensor([9, 10])
    ref = sample_tokens(bundle.model, batch, other, SMALL, prefix_tokens=full[:, :2]).tokens
    static = sample_tokens_static(bundle.model, batch, other, SMALL, prefix_tokens=full[:, :2], cache_len_multiple=1)
    assert torch.equal(static.tokens, ref)
    assert torch.equal(static.tokens[:, :2], full[:, :2]) and (static.tokens[:, 2:] - full[:, 2:]).abs().max() > 0.1


def test_a_runner_is_kept_for_like_batches_and_rebuilt_otherwise():
    tiny = build_random("tiny", seed=0)
    model = tiny.model

    def run(prompts, settings=SMALL):
        batch = build_prompt_batch(tiny.tokenizer, tiny.ids, prompts, (16, 16), with_uncond=True)
        sample_tokens_static(model, batch, torch.arange(len(prompts)), settings)
        return _RUNNERS[model]

    first = run(["a red circle", "x"])
    assert run(["two blue squares", "y"]) is first  # other prompt lengths, same 64-slot bucket
    assert run(["a", "b", "c"]) is not first  # other batch size
    third = run(["a", "b", "c"])
    assert run(["a", "b", "c"], SamplingConfig(image_size=16, cfg_scale=3.0, num_head_steps=5)) is not third
    fourth = _RUNNERS[model]
    with torch.no_grad():  # weights replaced by new tensors: the captured addresses would be stale
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
    assert run(["a", "b", "c"], SamplingConfig(image_size=16, cfg_scale=3.0, num_head_steps=5)) is not fourth
    release_runners(model)
    assert model not in _RUNNERS


HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "unique", "_unique2"}


class HostReads(TorchDispatchMode):
    """Counts ops whose result the host must wait for (a sync on CUDA): .item(), bool(t), nonzero, ..."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loop", ["reference", "static"])
@pytest.mark.parametrize("noise", ["counter", "published"])
def test_no_host_read_per_image_token(loop, noise):
    tiny = build_random("tiny", seed=0)
    counts = []
    for size in (16, 48):  # 1 and 9 image tokens
        settings = SamplingConfig(image_size=size, cfg_scale=3.0, num_head_steps=3, noise=noise)
        batch = build_prompt_batch(tiny.tokenizer, tiny.ids, PROMPTS[:2], (size, size), with_uncond=True)
        fn = sample_tokens if loop == "reference" else sample_tokens_static
        with HostReads() as reads:
            fn(tiny.model, batch, torch.tensor([1, 2]), settings, record_chains=True)
        counts.append(reads.count)
    assert counts[0] == counts[1]  # per batch only: published noise reads its seeds' range once
    assert counts[0] == (2 if noise == "published" else 0)
    with HostReads() as reads:
        torch.ones(2).sum().item()
    assert reads.count == 1  # the detector sees a host read


def test_cuda_graphs_setting_follows_the_device():
    assert use_cuda_graphs(None, torch.device("cpu")) is False
    assert use_cuda_graphs(False, torch.device("cuda")) is False
    assert use_cuda_graphs(None, torch.device("cuda")) is True
    with pytest.raises(ConfigError, match="cuda_graphs: true needs a CUDA device"):
        use_cuda_graphs(True, torch.device("cpu"))
    tiny = build_random("tiny", seed=0)
    with pytest.raises(ConfigError, match="cuda_graphs"):
        sample_prompts(tiny, ["a"], [0], SamplingConfig(image_size=32, num_head_steps=2, cuda_graphs=True))
    auto = sample_prompts(tiny, ["a"], [0], SamplingConfig(image_size=32, num_head_steps=2)).tokens
    off = sample_prompts(tiny, ["a"], [0], SamplingConfig(image_size=32, num_head_steps=2, cuda_graphs=False)).tokens
    assert torch.equal(auto, off)  # on a CPU: the reference loop either way


def test_gen_pos_embed_read_by_a_device_index_equals_the_sliced_one():
    tiny = build_random("tiny", seed=0, overrides={"use_gen_pos_embed": True})
    model = tiny.model
    h = torch.randn(4, model.config.hidden_size)
    for j in (0, 5, 1023):
        by_index = model.image_condition(h, token_index=torch.tensor(j))
        torch.testing.assert_close(by_index, model.image_condition(h, token_index=j), atol=0, rtol=0)
    batch = build_prompt_batch(tiny.tokenizer, tiny.ids, PROMPTS[:2], (32, 32), with_uncond=True)
    ref = sample_tokens(model, batch, torch.tensor([1, 2]), SMALL)
    static = sample_tokens_static(model, batch, torch.tensor([1, 2]), SMALL, cache_len_multiple=1)
    assert torch.equal(static.tokens, ref.tokens)
