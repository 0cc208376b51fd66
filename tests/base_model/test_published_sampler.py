"""Exactness against the NextStep-1 GitHub release's sampler and model: its final_euler time grid and
its final Euler step, the pipelines' torch-generator noise, gen_pos_embed, the config's decoder biases, and the
three-branch (image-edit) guidance."""

import json
import math

import pytest
import torch

from base_model.checkpoint import build_random, load_checkpoint, save_checkpoint
from base_model.flow import (
    PUBLISHED_LAST_STEP,
    PublishedNoise,
    combine_guidance,
    head_step,
    num_sde_steps,
    time_grid,
)
from base_model.generate import sample_prompts
from base_model.model import gen_pos_embed_table
from base_model.sampler import SamplingConfig, guided_velocity, sample_token
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import score_chains, teacher_forced
from core.errors import UserError

PUBLISHED = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=5, time_grid="final_euler")


# -- the time grid --------------------------------------------------------------------------------


def test_published_grid_hand_values():
    """N = 5: linspace(0, 0.96, 5) = 0, .24, .48, .72, .96, then .96 + .04 = 1.
    Shift 3 maps t -> t / (3 - 2t): .24/2.52, .48/2.04, .72/1.56, .96/1.08 = .0952381, .2352941,
    .4615385, .8888889, and the Euler step adds an unshifted .04: .9288889 (the chain stops short of 1)."""
    assert time_grid(5, kind="final_euler").tolist() == pytest.approx([0.0, 0.24, 0.48, 0.72, 0.96, 1.0], abs=1e-7)
    shifted = time_grid(5, shift=3.0, kind="final_euler").tolist()
    assert shifted == pytest.approx([0.0, 0.0952381, 0.2352941, 0.4615385, 0.8888889, 0.9288889], abs=1e-6)
    assert shifted[-1] - shifted[-2] == pytest.approx(PUBLISHED_LAST_STEP, abs=1e-7)
    # uniform keeps its meaning: K steps to exactly 1
    assert time_grid(4, shift=3.0).tolist() == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0])
    assert (num_sde_steps("final_euler", 5), num_sde_steps("uniform", 5)) == (4, 5)
    assert PUBLISHED.num_scored_steps == 4


def test_published_grid_needs_two_steps():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="time_grid final_euler needs >= 2"):
        SamplingConfig(image_size=64, num_head_steps=1, time_grid="final_euler").validate()


def test_last_published_step_is_a_deterministic_euler_step_of_0_04(tiny):
    """One token, given noise: steps 0..3 are the SDE step with noise[k+1] (checked against head_step),
    the last is x^5 = x^4 + 0.04 v(x^4, t_4) with no noise, and only the 4 SDE steps carry log-probs."""
    torch.manual_seed(1)
    cond = torch.randn(4, tiny.model.config.hidden_size)  # [cond | uncond] rows of 2 samples
    noise = torch.randn(2, 5, 64)  # x^0 and 4 step draws: none for the Euler step
    grid = time_grid(5, 2.0, kind="final_euler").tolist()
    x, chain, logps = sample_token(tiny.model, cond, torch.tensor([0, 1]), 0, grid, PUBLISHED, True, noise)
    assert chain.shape == (2, 6, 64) and logps.shape == (2, 4)
    torch.testing.assert_close(chain[:, 0], noise[:, 0], rtol=0, atol=0)
    v = guided_velocity(tiny.model, chain[:, 2], grid[2], cond, 3.0)
    step = head_step(chain[:, 2], v, grid[2], grid[3], "sde", noise=noise[:, 3])
    torch.testing.assert_close(chain[:, 3], step.x_next, rtol=0, atol=1e-6)
    torch.testing.assert_close(logps[:, 2], step.log_prob, rtol=0, atol=1e-4)
    v_last = guided_velocity(tiny.model, chain[:, 4], grid[4], cond, 3.0)
    torch.testing.assert_close(chain[:, 5], chain[:, 4] + PUBLISHED_LAST_STEP * v_last, rtol=0, atol=1e-6)
    torch.testing.assert_close(x, chain[:, 5], rtol=0, atol=0)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_scorer_recomputes_the_published_sde_steps(tiny, cfg_scale):
    """Rollout and teacher-forced re-scoring agree on every SDE step; the Euler step is in the chain
    (K+1 states) but has no log-prob on either side."""
    sampling = SamplingConfig(image_size=64, cfg_scale=cfg_scale, num_head_steps=5, timestep_shift=2.0,
                              time_grid="final_euler")  # fmt: skip
    prompts = ["a red circle", "three yellow squares at the top"]
    res = sample_prompts(tiny, prompts, [1, 2], sampling, record_chains=True)
    assert res.chains.shape == (2, 16, 6, 64) and res.log_probs.shape == (2, 16, 4)
    batch = build_prompt_batch(tiny.tokenizer, tiny.ids, prompts, (64, 64), with_uncond=sampling.uses_guidance)
    with torch.no_grad():
        scores = score_chains(tiny.model, batch, tiny.ids, res.tokens, res.chains, sampling)
    assert scores.means.shape == (2, 16, 4, 64) and scores.stds.shape == (4,)
    # as in test_sampler: fp32 sums of up to ~70 in magnitude, one parallel pass vs token by token
    torch.testing.assert_close(scores.log_probs, res.log_probs, atol=2e-5, rtol=0)
    last = torch.nn.functional.layer_norm(res.chains[:, :, -1], (64,), eps=1e-6)
    torch.testing.assert_close(last, res.tokens)


# -- published noise --------------------------------------------------------------------------------


def test_published_noise_replays_a_hand_built_randn_sequence(tiny):
    """2 captions x 2 images, seeds 7, 8, 7, 8 = one published call with seed 7, n = 2. With K = 3 on the
    final_euler grid a token draws 1 + 2 times randn((2, 64)): x^0 of token j is draw 3j, and rows 0, 2
    (and 1, 3) share it. A sampler that drew for the Euler step would start token 1 at draw 4."""
    sampling = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=3, time_grid="final_euler",
                              noise="published")  # fmt: skip
    prompts = ["a cat", "a cat", "a dog", "a dog"]  # caption-major, as published
    res = sample_prompts(tiny, prompts, [7, 8, 7, 8], sampling, record_chains=True)
    gen = torch.Generator().manual_seed(7)
    draws = [torch.randn((2, 64), generator=gen) for _ in range(16 * 3)]
    for j in range(16):
        x0 = draws[3 * j]  # [2, 64]
        torch.testing.assert_close(res.chains[:, j, 0], x0[[0, 1, 0, 1]], rtol=0, atol=0)
    direct = PublishedNoise(torch.tensor([7, 8, 7, 8]), 64, "cpu").draw(3)  # [4, 3, 64]
    torch.testing.assert_close(direct, torch.stack(draws[:3], dim=1)[[0, 1, 0, 1]], rtol=0, atol=0)


def test_published_noise_refuses_seeds_of_no_single_call():
    with pytest.raises(UserError, match="seeds must be s, s\\+1"):
        PublishedNoise(torch.tensor([0, 100]), 64, "cpu")


def _published_pipeline(model, batch, ids, gen, n, cfg_scale, num_steps, shift):
    """NextStep-1's decoding loop written out (pipeline_nextstep.decoding + FlowMatchingHead.sample),
    independent of our sampler: conditions from full teacher-forced passes, the grid from linspace,
    the score-form drift, randn((n, 64)) tiled over the batch, then a 0.04 Euler step and use_norm."""
    b, t = batch.num_prompts, batch.num_image_tokens
    tokens = torch.zeros(b, t, 64)
    ts = torch.linspace(0, 1 - 0.04, num_steps)
    ts = ts / (shift - (shift - 1) * ts)
    for j in range(t):
        c = teacher_forced(model, batch, ids, tokens).image_cond[:, j]  # [2B, H]; causal: tokens >= j unused

        def vel(x, ti, c=c):
            v = model.velocity(torch.cat([x, x]), ti.expand(2 * b), c)
            return v[b:] + cfg_scale * (v[:b] - v[b:])

        x = torch.randn((n, 64), generator=gen).repeat(b // n, 1)
        for ti, tj in zip(ts[:-1], ts[1:]):
            v = vel(x, ti)
            score = (ti * v - x) / ((1 - ti) ** 2 + ti * (1 - ti))
            drift = v + (1 - ti) * score
            w = torch.randn((n, 64), generator=gen).repeat(b // n, 1)
            x = x + drift * (tj - ti) + torch.sqrt(2 * (1 - ti)) * (w * torch.sqrt(tj - ti))
        x = x + vel(x, ts[-1]) * 0.04
        tokens[:, j] = torch.nn.functional.layer_norm(x, (64,), eps=1e-6)
    return tokens


def test_published_noise_and_grid_reproduce_the_published_loop(tiny):
    """The whole token loop against `_published_pipeline` with the same generator seed."""
    prompts = ["a cat", "a cat", "two dogs", "two dogs"]  # 2 captions x num_images_per_caption 2
    sampling = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=4, timestep_shift=2.0,
                              time_grid="final_euler", noise="published")  # fmt: skip
    ours = sample_prompts(tiny, prompts, [5, 6, 5, 6], sampling).tokens
    batch = build_prompt_batch(tiny.tokenizer, tiny.ids, prompts, (64, 64), with_uncond=True)
    with torch.no_grad():
        ref = _published_pipeline(tiny.model, batch, tiny.ids, torch.Generator().manual_seed(5), 2, 3.0, 4, 2.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # measured 7e-7: fp32 op order only
    assert (ours[0] - ours[1]).abs().max() > 0.1  # image 0 and 1 of a caption: other draw rows


# -- gen_pos_embed ----------------------------------------------------------------------------------


def test_gen_pos_embed_table_hand_values():
    """H = 8, grid 2: w = 10000^(-i/2), i < 2 = (1, 0.01); token p = 2r + c -> [e(c) | e(r)] with
    e(q) = [sin q, sin .01q, cos q, cos .01q]. Token 1 (r 0, c 1) and token 2 (r 1, c 0):"""
    table = gen_pos_embed_table(8, grid=2)
    assert table.shape == (1, 4, 8) and table.dtype == torch.float32
    e1 = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    e0 = [0.0, 0.0, 1.0, 1.0]
    assert table[0, 0].tolist() == pytest.approx(e0 + e0)
    assert table[0, 1].tolist() == pytest.approx(e1 + e0)
    assert table[0, 2].tolist() == pytest.approx(e0 + e1)
    assert table[0, 3].tolist() == pytest.approx(e1 + e1)
    assert gen_pos_embed_table(64).shape == (1, 1024, 64)  # the published 32 x 32


@pytest.fixture(scope="module")
def pos_tiny():
    """The `tiny` weights, once without and once with use_gen_pos_embed."""
    plain = build_random("tiny", seed=0)
    with_pos = build_random("tiny", seed=0, overrides={"use_gen_pos_embed": True})
    return plain, with_pos


def test_gen_pos_embed_is_added_to_the_condition(pos_tiny):
    plain, with_pos = pos_tiny
    assert torch.equal(plain.model.lm_head.weight, with_pos.model.lm_head.weight)  # same weights
    h = torch.randn(3, 64)
    table = with_pos.model.gen_pos_embed[0]  # [1024, 64]
    want = plain.model.image_out_projector(h + table[5])
    torch.testing.assert_close(with_pos.model.image_condition(h, token_index=5), want)
    seq = with_pos.model.image_condition(h[:, None].expand(-1, 4, -1), token_index=0)  # tokens 0..3
    torch.testing.assert_close(seq[:, 3], plain.model.image_out_projector(h + table[3]))
    assert not torch.allclose(seq[:, 0], seq[:, 1])  # same hidden state, another token: another condition
    with pytest.raises(UserError, match="covers 1024 image tokens"):
        with_pos.model.image_condition(h, token_index=1024)


def test_gen_pos_embed_changes_samples_and_scoring_follows(pos_tiny):
    plain, with_pos = pos_tiny
    sampling = SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4, time_grid="final_euler")
    a = sample_prompts(plain, ["a cat"], [3], sampling).tokens
    res = sample_prompts(with_pos, ["a cat"], [3], sampling, record_chains=True)
    # the random tiny head reads its condition weakly (init std 0.02): measured 1.1e-3 apart, and a rerun
    # of the same model is bit-identical (test_sampler), so any difference is the position term's
    assert (a - res.tokens).abs().max() > 2e-4
    batch = build_prompt_batch(with_pos.tokenizer, with_pos.ids, ["a cat"], (64, 64), with_uncond=False)
    with torch.no_grad():
        scores = score_chains(with_pos.model, batch, with_pos.ids, res.tokens, res.chains, sampling)
    torch.testing.assert_close(scores.log_probs, res.log_probs, atol=2e-5, rtol=0)


def test_gen_pos_embed_round_trips_and_is_rebuilt_when_absent(pos_tiny, tmp_path):
    _, with_pos = pos_tiny
    with torch.no_grad():
        with_pos.model.gen_pos_embed.mul_(2.0)  # a checkpoint's own values win over the rebuilt table
    try:
        loaded = load_checkpoint(save_checkpoint(with_pos, tmp_path / "pos"))
        assert torch.equal(loaded.model.gen_pos_embed, with_pos.model.gen_pos_embed)
    finally:
        with torch.no_grad():
            with_pos.model.gen_pos_embed.div_(2.0)
    from safetensors.torch import load_file, save_file

    for shard in sorted((tmp_path / "pos").glob("model-*.safetensors")):  # drop the key from the weights
        state = load_file(str(shard))
        state.pop("gen_pos_embed", None)
        save_file(state, str(shard), metadata={"format": "pt"})
    index = tmp_path / "pos" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].pop("gen_pos_embed")
    index.write_text(json.dumps(data))
    rebuilt = load_checkpoint(tmp_path / "pos")
    assert torch.equal(rebuilt.model.gen_pos_embed, gen_pos_embed_table(64))


# -- decoder biases -----------------------------------------------------------------------------------


def test_o_attention_and_mlp_biases_load_strictly(tmp_path):
    bundle = build_random("tiny", seed=0, overrides={"o_attention_bias": True, "mlp_bias": True})
    layer = bundle.model.layers[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    assert layer.self_attn.q_proj.bias is not None  # attention_bias stays Qwen2's
    with torch.no_grad():
        for m in bundle.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_()
    loaded = load_checkpoint(save_checkpoint(bundle, tmp_path / "b"))  # strict: no missing/unexpected key
    got = loaded.model.layers[1]
    assert torch.equal(got.self_attn.o_proj.bias, bundle.model.layers[1].self_attn.o_proj.bias)
    assert torch.equal(got.mlp.gate_proj.bias, bundle.model.layers[1].mlp.gate_proj.bias)
    assert (loaded.model.config.o_attention_bias, loaded.model.config.mlp_bias) == (True, True)


def test_bias_keys_read_as_nextstep_1_does():
    """attention_bias given: o_attention_bias defaults to it (NextStep-1's rule); absent: Qwen2's layout."""
    from base_model.config import NextStepConfig
    from base_model.model import NextStepModel

    def biases(**kw):
        config = NextStepConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=32, fm_head_dim=8, fm_head_layers=1, vocab_size=32, **kw)  # fmt: skip
        layer = NextStepModel(config).layers[0]
        return tuple(m.bias is not None for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj))

    assert biases() == (True, False, False)  # no key: Qwen2 (NextStep-1.1 and our earlier checkpoints)
    assert biases(attention_bias=True) == (True, True, False)
    assert biases(attention_bias=True, o_attention_bias=False) == (True, False, False)
    assert biases(attention_bias=False, mlp_bias=True) == (False, False, True)


# -- three-branch guidance --------------------------------------------------------------------------


def test_three_branch_guidance_hand_values():
    """v_c = (2, 0), v_u (image kept, text dropped) = (1, 1), v_null = (0.5, 3); scale 3, image_scale 2:
    0.5 + 2 (1 - 0.5) + 3 (2 - 1) = 4.5 and 3 + 2 (1 - 3) + 3 (0 - 1) = -4. At image_scale 1 the
    result is the two-branch one, v_u + 3 (v_c - v_u) = (4, -2), whatever v_null."""
    vc, vu, vn = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 3.0])
    assert combine_guidance(vc, vu, 3.0, v_null=vn, image_scale=2.0).tolist() == pytest.approx([4.5, -4.0])
    assert combine_guidance(vc, vu, 3.0, v_null=vn, image_scale=1.0).tolist() == pytest.approx([4.0, -2.0])
    assert combine_guidance(vc, vu, 3.0).tolist() == pytest.approx([4.0, -2.0])
