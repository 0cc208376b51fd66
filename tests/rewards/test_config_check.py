"""Reward configs (strict, every YAML under configs/rewards), preprocessing helpers, `nsalign rewards check`."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.errors import ConfigError, UserError
from core.schema import from_dict, load_config
from jobs.cli import main
from rewards.base import RewardsConfig, check_inputs
from rewards.common import letterbox, resize_center_crop
from rewards.imagereward import Config as ImageRewardConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rewards"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_rewards_yaml_loads(path):
    config = load_config(RewardsConfig, path)
    assert config.rewards and all(s.family_config(s.name) is not None for s in config.rewards)


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.type: unknown reward type 'hpsv3'"):
        from_dict(RewardsConfig, {"rewards": [{"name": "h", "type": "hpsv3"}]})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.params: unknown key 'qualty'"):
        from_dict(RewardsConfig, {"rewards": [{"name": "j", "type": "jpeg", "params": {"qualty": 90}}]})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.params\.quality: expected an integer"):
        from_dict(RewardsConfig, {"rewards": [{"name": "j", "type": "jpeg", "params": {"quality": "high"}}]})
    with pytest.raises(ConfigError, match="duplicate reward name 'j'"):
        from_dict(RewardsConfig, {"rewards": [{"name": "j", "type": "jpeg"}, {"name": "j", "type": "ocr"}]})
    with pytest.raises(ConfigError, match="num_gpus_per_worker"):
        from_dict(
            RewardsConfig, {"rewards": [{"name": "j", "type": "jpeg"}], "device": "cuda", "pool": {"kind": "ray"}}
        )


def test_inputs_are_checked():
    with pytest.raises(UserError, match="uint8 images"):
        check_inputs(torch.zeros(1, 3, 8, 8), ["x"])
    with pytest.raises(UserError, match="2 images but 1 prompts"):
        check_inputs(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["x"])


def test_preprocessing_matches_torchvision_on_pil():
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    rng = np.random.default_rng(0)
    for w, h in ((97, 61), (61, 97), (300, 300)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = np.asarray(resize_center_crop(image, 32))
        theirs = np.asarray(Compose([Resize(32, InterpolationMode.BICUBIC), CenterCrop(32)])(image))
        np.testing.assert_array_equal(ours, theirs)
    white = torch.full((1, 3, 50, 100), 255, dtype=torch.uint8)
    boxed = letterbox(white, 40)[0]  # [3, 40, 40] in [0, 1]
    assert boxed.shape == (3, 40, 40)
    assert boxed[:, :10].max() == 0 and boxed[:, 30:].max() == 0  # 40 x 20 centred, black padding
    torch.testing.assert_close(boxed[:, 10:30], torch.ones(3, 20, 40))


def test_hps_letterbox_is_upstreams_float_tensor_pipeline():
    """HPSv2: ToTensor, then ResizeMaxSize on the float tensor (torchvision bicubic, antialias) and pad;
    97 x 61 -> 40 x round(61 * 40 / 97) = 40 x 25, padded 7 above and 8 below. No rounding to uint8 and
    no clamping: a black/white step overshoots below 0 and above 1, which the uint8 PIL path cannot."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 61, 97), dtype=np.uint8))
    theirs = TF.resize(images.float() / 255, [25, 40], InterpolationMode.BICUBIC, antialias=True)
    theirs = TF.pad(theirs, [0, 7, 0, 8], fill=0)
    torch.testing.assert_close(letterbox(images, 40), theirs, atol=1e-6, rtol=0)
    step = torch.zeros(1, 3, 60, 120, dtype=torch.uint8)
    step[..., 60:] = 255
    boxed = letterbox(step, 40)
    assert float(boxed.min()) < -0.01 and float(boxed.max()) > 1.01


def write_config(tmp_path: Path, rewards: list[dict]) -> Path:
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml.safe_dump({"rewards": rewards}))
    return path


def test_check_tiny_config_passes_with_load(capsys):
    assert main(["rewards", "check", str(CONFIGS / "tiny.yaml"), "--load"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "all 4 rewards ready and loadable" in out


def test_check_reports_each_missing_file_and_exits_2(tmp_path, capsys):
    path = write_config(tmp_path, [
        {"name": "ir", "type": "imagereward",
         "params": {"checkpoint": "/nowhere/ImageReward.pt", "med_config": "/nowhere/med_config.json",
                    "vocab_dir": "/nowhere"}},
        {"name": "hps", "type": "hps", "params": {"checkpoint": "/nowhere/HPS_v2.1_compressed.pt"}},
        {"name": "jpeg", "type": "jpeg"},
    ])  # fmt: skip
    assert main(["rewards", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2  # one line per reward with a problem
    assert err[0].startswith("nsalign rewards check: reward 'ir': params.checkpoint: /nowhere/ImageReward.pt missing")
    assert "blip.visual_encoder.*" in err[0] and "hub THUDM/ImageReward" in err[0]
    assert "/nowhere/HPS_v2.1_compressed.pt missing" in err[1] and "hub xswu/HPSv2" in err[1]


def test_check_load_finds_a_mismatched_checkpoint(tmp_path, bert_vocab_dir, capsys):
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 32)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text("{}")
    path = write_config(tmp_path, [{"name": "ir", "type": "imagereward", "params": {
        "checkpoint": str(tmp_path / "ImageReward.pt"), "med_config": str(tmp_path / "med_config.json"),
        "vocab_dir": bert_vocab_dir, "size": "tiny"}}])  # fmt: skip
    assert main(["rewards", "check", str(path)]) == 0  # the files are there
    assert main(["rewards", "check", str(path), "--load"]) == 2
    assert "med_config lacks keys" in capsys.readouterr().err
    config = ImageRewardConfig(str(tmp_path / "ImageReward.pt"), None, bert_vocab_dir, size="tiny")
    assert config.files()  # the published pair is always listed for init: checkpoint


def test_check_reads_a_section_of_a_job_config(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"steps": 10, "reward": {"rewards": [{"name": "j", "type": "jpeg"}]}}))
    assert main(["rewards", "check", str(job), "--section", "reward"]) == 0
    assert main(["rewards", "check", str(job), "--section", "nope"]) == 2
    assert "no section 'nope'" in capsys.readouterr().err
