"""The VAE trainer learns, saves the published layout, and the world configs fail naming the bad key."""

import pytest
import torch

from base_model.vae import VAEConfig, load_vae, save_vae
from core.errors import ConfigError
from core.schema import from_dict, load_config
from shapes.splits import WorldDataConfig
from shapes.train_vae import VaeTrainConfig, lr_at, reconstruct, reconstruction_loss, train_vae
from shapes.world import WorldConfig, world_images

TINY = VAEConfig(ch=8, ch_mult=[1, 1, 1, 1], num_res_blocks=1, norm_groups=4)


def test_reconstruction_loss_by_hand():
    x = torch.ones(1, 3, 2, 2)  # all white: no foreground
    x[0, :, 0, 0] = -1.0  # one black pixel: foreground
    recon = x.clone()
    recon[0, 0, 0, 0] += 0.5  # error 0.5 on the foreground pixel
    recon[0, 0, 1, 1] -= 0.5  # error 0.5 on a background pixel
    per = 0.5 + 0.25
    assert reconstruction_loss(recon, x, 0.0) == pytest.approx(2 * per / 12)
    assert reconstruction_loss(recon, x, 4.0) == pytest.approx((5 * per + per) / 12)


def test_lr_warms_up_then_decays_to_a_tenth():
    config = VaeTrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(100, config) == pytest.approx(0.1)


@pytest.fixture
def one_thread():
    """Convolutions on 2 busy-waiting threads crawl when other jobs share the cores; one thread does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_few_steps_reduce_the_reconstruction_error(tmp_path, one_thread):
    images = world_images(WorldDataConfig(num_pretrain=16))[:, :, 16:48, 16:48]  # 32 x 32 crops: cheaper
    config = VaeTrainConfig(arch=TINY, steps=8, batch_images=4, lr=3e-3, warmup_steps=1)
    untrained = torch.nn.functional.l1_loss(
        reconstruct(train_vae(VaeTrainConfig(arch=TINY, steps=1, lr=1e-12), images, 0)[0], images).float(),
        images.float(),
    )
    vae, losses = train_vae(config, images, log_every=0)
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    trained = torch.nn.functional.l1_loss(reconstruct(vae, images).float(), images.float())
    assert trained < untrained
    back = load_vae(save_vae(vae, tmp_path / "vae"))
    assert (tmp_path / "vae" / "checkpoint.pt").is_file() and back.config == vae.config
    assert torch.equal(reconstruct(back, images[:2]), reconstruct(vae, images[:2]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.noise_share=1.5"], "data.noise_share"),
        (["data.colors=[red, purple]"], "data.colors"),
        (["data.kind_weights={single: 1, pairs: 1}"], "data.kind_weights"),
        (["vae.arch.z_channels=8"], "vae.arch"),
        (["vae.steps=0"], "vae.steps"),
        (["model.hidden_size=130"], "model.num_attention_heads"),
        (["model.layers=2"], "unknown key 'layers'"),
    ],
)
def test_world_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(WorldConfig, "configs/shapes_world/world.yaml", overrides)


def test_defaults_load():
    assert from_dict(WorldConfig, {}).vae.arch.token_dim == 64


def test_committed_pretrained_world_model_loads():
    from pathlib import Path

    from base_model.checkpoint import load_checkpoint

    bundle = load_checkpoint(Path(__file__).resolve().parents[2] / "shapes" / "assets" / "pretrained")
    assert bundle.model.config.hidden_size == 128 and bundle.vae.config.token_dim == 64
