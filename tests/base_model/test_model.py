"""Backbone, sequences, teacher-forced losses and parameter counts."""

import pytest
import torch

from base_model.config import preset_config
from base_model.model import KVCache, NextStepModel
from base_model.sequence import append_image_block, build_prompt_batch, grid_for_size
from base_model.teacher_forcing import flow_errors, per_image_flow_error, sft_loss, teacher_forced


def test_large_preset_parameter_counts_match_the_published_model():
    with torch.device("meta"):
        m = NextStepModel(preset_config("nextstep-1-large"))

    def count(mod):
        return sum(p.numel() for p in mod.parameters())

    head, proj = count(m.image_head), count(m.image_in_projector) + count(m.image_out_projector)
    backbone = count(m) - head - proj
    assert backbone == pytest.approx(14.77e9, rel=0.005)
    assert head == pytest.approx(157.2e6, rel=0.005)
    assert proj == pytest.approx(26.6e6, rel=0.005)


def test_state_dict_keys_follow_the_published_layout(tiny):
    keys = set(tiny.model.state_dict())
    for k in [
        "embed_tokens.weight", "layers.0.self_attn.q_proj.bias", "layers.1.mlp.down_proj.weight",
        "layers.0.post_attention_layernorm.weight", "norm.weight", "lm_head.weight",
        "image_in_projector.bias", "image_out_projector.weight", "image_head.net.input_proj.weight",
        "image_head.net.time_embed.mlp.0.weight", "image_head.net.time_embed.mlp.2.bias",
        "image_head.net.cond_embed.weight", "image_head.net.res_blocks.1.in_ln.weight",
        "image_head.net.res_blocks.0.mlp.2.weight", "image_head.net.res_blocks.0.adaLN_modulation.1.weight",
        "image_head.net.final_layer.linear.weight", "image_head.net.final_layer.adaLN_modulation.1.bias",
    ]:  # fmt: skip
        assert k in keys, k
    assert "layers.0.self_attn.o_proj.bias" not in keys
    assert not any(k.startswith("model.") or "rotary" in k for k in keys)


def test_prompt_layout_left_padding_prefix_and_cfg_rows(tiny):
    tok, ids = tiny.tokenizer, tiny.ids
    b = build_prompt_batch(tok, ids, ["ab", "abcd"], (64, 32), with_uncond=True, negative_prompt="z")
    assert b.grid_hw == (4, 2) and b.num_image_tokens == 8
    assert b.input_ids.shape[0] == 4  # [cond x2 | uncond x2]
    text = tok.decode(b.input_ids[0][b.attention_mask[0]])
    assert text == "ab<|image_area|>4*2<|begin_of_image|>"
    assert tok.decode(b.input_ids[3][b.attention_mask[3]]) == "z<|image_area|>4*2<|begin_of_image|>"
    assert (~b.attention_mask[0]).sum() == 2  # "ab" padded on the left to the length of "abcd"
    assert b.input_ids[0, 0] == ids.pad and b.input_ids[0, -1] == ids.boi
    full, mask = append_image_block(b, ids)
    assert full.shape[1] == b.prompt_len + 8 + 1
    assert (full[:, b.prompt_len : -1] == ids.placeholder).all() and (full[:, -1] == ids.eoi).all()
    with pytest.raises(ValueError):
        grid_for_size(60, 64)


def test_kv_cache_decoding_equals_the_full_forward(tiny):
    model, ids = tiny.model, tiny.ids
    batch = build_prompt_batch(tiny.tokenizer, ids, ["a cat", "a red dog"], (64, 64), with_uncond=True)
    tokens = torch.randn(2, 16, 64)
    full_ids, full_mask = append_image_block(batch, ids)
    img = torch.cat([tokens, tokens])
    with torch.no_grad():
        ref = model.forward_sequence(full_ids, full_mask, img)  # [R, L+T+1, H]
        rows, plen = full_ids.shape[0], batch.prompt_len
        max_len = full_ids.shape[1]
        cache = KVCache(model.config, rows, max_len, model.dtype, "cpu")
        pos = torch.arange(max_len)
        step = [model.backbone(model.embed(batch.input_ids), full_mask, pos[:plen], cache)]
        for j in range(16):
            emb = model.image_in_projector(img[:, j : j + 1])
            step.append(model.backbone(emb, full_mask, pos[plen + j : plen + j + 1], cache))
        cached = torch.cat(step, dim=1)
    valid = full_mask[:, : plen + 16]
    torch.testing.assert_close(cached[valid], ref[:, : plen + 16][valid], atol=2e-5, rtol=1e-4)


def test_teacher_forced_text_ce_counts_only_real_text_targets(tiny):
    ids = tiny.ids
    batch = build_prompt_batch(tiny.tokenizer, ids, ["ab", "abcd"], (64, 64), with_uncond=False)
    out = teacher_forced(tiny.model, batch, ids, torch.randn(2, 16, 64), compute_text_ce=True)
    # targets per row: unpadded text after the first token + prefix (<|image_area|> 4 * 4 <boi>) + eoi;
    # "ab": 1 + 5 + 1 = 7, "abcd": 3 + 5 + 1 = 9
    assert out.num_text_targets == 16
    assert out.image_cond.shape == (2, 16, tiny.model.config.hidden_size)
    assert torch.isfinite(out.text_ce)


def test_flow_errors_for_given_t_and_noise(tiny):
    model = tiny.model
    cond = torch.randn(2, 3, model.config.hidden_size)
    tokens, noise, t = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.rand(2, 3)
    err = flow_errors(model, cond, tokens, t, noise)
    x_t = t[..., None] * tokens + (1 - t[..., None]) * noise
    with torch.no_grad():
        v = model.image_head(x_t.reshape(-1, 64), t.reshape(-1), cond.reshape(6, -1)).reshape(2, 3, 64)
    expected = ((v - (tokens - noise)) ** 2).mean(-1)
    torch.testing.assert_close(err.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_image_flow_error(model, cond, tokens, t, noise).detach(), expected.mean(-1))


def test_sft_loss_weights_text_and_image_parts(tiny):
    ids = tiny.ids
    batch = build_prompt_batch(tiny.tokenizer, ids, ["a red circle"], (64, 64), with_uncond=False)
    out = sft_loss(tiny.model, batch, ids, torch.randn(1, 16, 64), generator=torch.Generator().manual_seed(0))
    config = tiny.model.config
    assert (config.lm_loss_weight, config.im_loss_weight, config.fm_head_batch_mul) == (0.01, 1.0, 4)
    expected = 0.01 * out.text_ce + 1.0 * out.flow_matching
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert tiny.model.image_head.net.input_proj.weight.grad is not None
    assert tiny.model.layers[0].self_attn.q_proj.weight.grad is not None
    tiny.model.zero_grad(set_to_none=True)
