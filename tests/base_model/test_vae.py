"""The NextStep-1 image tokenizer: token layout, normalisation, published key names, checkpoint errors."""

import json

import pytest
import torch

from base_model.vae import (
    NextStepVAE,
    VAEConfig,
    load_vae,
    patchify,
    perturb_latent,
    save_vae,
    to_uint8,
    token_layer_norm,
    unpatchify,
    vae_preset,
)
from core.errors import CheckpointError, ConfigError

FLUX_AE_PARAMETERS = 83_819_683  # encoder + decoder tensors of FLUX.1's ae.safetensors


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return NextStepVAE(vae_preset("tiny")).eval()


@pytest.fixture
def saved(tmp_path, tiny_vae):
    return save_vae(tiny_vae, tmp_path / "vae")


def _images(batch=2, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- token layout


def test_patchify_layout_on_arange_latent():
    latent = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = patchify(latent)
    assert tokens.shape == (2, 2 * 3, 64)
    for c in range(16):
        for py in range(2):
            for px in range(2):
                # token 0 is the top-left 2x2 patch; token 4 is grid cell (row 1, col 1)
                assert tokens[0, 0, c * 4 + py * 2 + px] == latent[0, c, py, px]
                assert tokens[1, 4, c * 4 + py * 2 + px] == latent[1, c, 2 + py, 2 + px]
    # raster order: token 1 is the patch to the right of token 0
    assert tokens[0, 1, 0] == latent[0, 0, 0, 2]


def test_patchify_unpatchify_are_inverses():
    latent = torch.randn(3, 16, 8, 10)
    assert torch.equal(unpatchify(patchify(latent), (4, 5), 16), latent)
    tokens = torch.randn(3, 20, 64)
    assert torch.equal(patchify(unpatchify(tokens, (4, 5), 16)), tokens)


def test_unpatchify_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.randn(1, 20, 64), (4, 4), 16)


def test_token_layer_norm_zero_mean_unit_variance():
    x = torch.randn(2, 5, 64) * 7 + 3
    y = token_layer_norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4, rtol=0)
    # hand value: [1, 3] -> mean 2, std 1 -> [-1, 1]
    torch.testing.assert_close(token_layer_norm(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0]))


def test_perturb_latent_gamma_zero_is_identity_and_positive_adds_noise():
    z = torch.randn(4, 16, 8, 8)
    assert torch.equal(perturb_latent(z, 0.0), z)
    g = torch.Generator().manual_seed(0)
    noisy = perturb_latent(z, 0.5, generator=g)
    assert noisy.shape == z.shape and not torch.equal(noisy, z)


def test_to_uint8_hand_values():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even
    assert to_uint8(x).dtype == torch.uint8


# ---------------------------------------------------------------- the model


def test_tiny_encode_decode_shapes(tiny_vae):
    images = _images()
    with torch.no_grad():
        tokens = tiny_vae.encode(images)
        latent = tiny_vae.encode_latent(images)
        out = tiny_vae.decode(tokens, (4, 4))
    assert latent.shape == (2, 16, 8, 8)
    assert tokens.shape == (2, 16, 64)
    assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_encode_tokens_are_layer_normalised(tiny_vae):
    with torch.no_grad():
        tokens = tiny_vae.encode(_images())
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_scaling_and_shift_applied_to_latent(tiny_vae):
    config = VAEConfig(**{**vae_preset("tiny").to_json_dict(), "scaling_factor": 2.0, "shift_factor": 0.5})
    scaled = NextStepVAE(config).eval()
    scaled.load_state_dict(tiny_vae.state_dict())
    images = _images()
    with torch.no_grad():
        plain, z = tiny_vae.encode_latent(images), scaled.encode_latent(images)
        torch.testing.assert_close(z, (plain - 0.5) * 2.0)
        torch.testing.assert_close(scaled.decode_latent(z), tiny_vae.decode_latent(plain), atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_deterministic_flag_returns_mean(tiny_vae):
    images = _images()
    with torch.no_grad():
        a = tiny_vae.encode_latent(images, sample=True, generator=torch.Generator().manual_seed(3))
        b = tiny_vae.encode_latent(images, sample=True, generator=torch.Generator().manual_seed(3))
        mean = tiny_vae.encode_latent(images)
    assert torch.equal(a, b) and not torch.equal(a, mean)
    config = VAEConfig(**{**vae_preset("tiny").to_json_dict(), "deterministic": True})
    det = NextStepVAE(config).eval()
    det.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        assert torch.equal(det.encode_latent(images, sample=True), mean)


def test_flux_preset_has_published_keys_and_parameter_count():
    with torch.device("meta"):
        vae = NextStepVAE(vae_preset("flux"))
    keys = vae.state_dict().keys()
    for key in (
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.conv_out.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.mid.attn_1.q.weight",
    ):
        assert key in keys, key
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert vae.state_dict()["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert vae.state_dict()["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert sum(p.numel() for p in vae.parameters()) == FLUX_AE_PARAMETERS


# ---------------------------------------------------------------- config


def test_config_ignores_published_extras_and_round_trips():
    published = {**VAEConfig().to_json_dict(), "latent_channels": 16, "block_out_channels": [1, 2, 4, 4]}
    del published["norm_groups"]
    config = VAEConfig.from_json_dict(published)
    assert config == VAEConfig()
    assert VAEConfig.from_json_dict(config.to_json_dict()) == config


def test_config_bad_value_names_key():
    with pytest.raises(ConfigError, match="ch_mult"):
        VAEConfig.from_json_dict({"ch_mult": "1,2"})
    with pytest.raises(ConfigError, match="unknown VAE preset"):
        vae_preset("huge")


# ---------------------------------------------------------------- checkpoint I/O


def test_save_load_gives_identical_decode(saved, tiny_vae):
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint.pt", "config.json"]
    loaded = load_vae(saved).eval()
    tokens = torch.randn(1, 16, 64)
    with torch.no_grad():
        assert torch.equal(loaded.decode(tokens, (4, 4)), tiny_vae.decode(tokens, (4, 4)))
    assert loaded.config == tiny_vae.config


def test_load_applies_dtype(saved):
    assert next(load_vae(saved, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_published_style_checkpoint_loads(tmp_path, tiny_vae):
    """Written by hand as the authors publish it: wrapped state dict, config with extra keys."""
    d = tmp_path / "published"
    d.mkdir()
    torch.save({"state_dict": dict(tiny_vae.state_dict())}, d / "checkpoint.pt")
    config = {**tiny_vae.config.to_json_dict(), "latent_channels": 16, "block_out_channels": [1, 1, 2, 2]}
    (d / "config.json").write_text(json.dumps(config))
    loaded = load_vae(d)
    for key, value in tiny_vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_directory_and_files_are_named(tmp_path, saved):
    with pytest.raises(CheckpointError, match="directory not found"):
        load_vae(tmp_path / "nope")
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_vae(saved)


def test_missing_weights_file_is_named(saved):
    (saved / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_vae(saved)


def test_truncated_checkpoint_is_named(saved):
    path = saved / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checkpoint.pt.*cannot be read"):
        load_vae(saved)


def test_non_tensor_entry_is_named(saved):
    torch.save({"encoder.conv_in.weight": [1, 2, 3]}, saved / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt.*not a tensor"):
        load_vae(saved)


def test_missing_key_is_named(saved, tiny_vae):
    state = dict(tiny_vae.state_dict())
    del state["decoder.conv_out.bias"]
    torch.save(state, saved / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: 1 missing keys: decoder\.conv_out\.bias"):
        load_vae(saved)


def test_unexpected_key_is_named(saved, tiny_vae):
    state = {**tiny_vae.state_dict(), "encoder.quant_conv.weight": torch.zeros(1)}
    torch.save(state, saved / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.quant_conv.weight"):
        load_vae(saved)


def test_shape_mismatch_is_named(saved, tiny_vae):
    state = dict(tiny_vae.state_dict())
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    torch.save(state, saved / "checkpoint.pt")
    pattern = (
        r"checkpoint.pt: shape mismatch for encoder.conv_in.weight: "
        r"expected \(32, 3, 3, 3\), found \(32, 3, 1, 1\)"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_vae(saved)


def test_bad_config_json_is_named(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_vae(saved)
