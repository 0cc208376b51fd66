"""`python -m jobs.shapes_world` end to end on a reduced budget (slow: DeepSpeed start-up, sampling)."""

import json

import pytest
import torch

from base_model.checkpoint import load_checkpoint
from core.schema import from_dict
from jobs.shapes_world import main
from rewards.base import RewardsConfig

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_build_world_writes_every_artefact(tmp_path):
    out = tmp_path / "world"
    overrides = [
        "data.num_pretrain=64", "data.num_sft=16", "data.num_prefs=8", "data.num_eval=6", "data.num_cot=16",
        "vae.steps=2",
        "pretrain_overrides=[steps=2, learner.total_steps=2, checkpoint_every=2]", "eval.seeds_per_prompt=1",
        "eval.grid_prompts=2", "cot_overrides=[steps=2, learner.total_steps=2, checkpoint_every=2]",
    ]  # fmt: skip
    assert main(["configs/shapes_world/world.yaml", "--out", str(out), *overrides]) == 0
    for name in (
        "pretrain.parquet",
        "sft.parquet",
        "cot.parquet",
        "heldout.parquet",
        "prefs.jsonl",
        "eval.jsonl",
        "metadata.jsonl",
    ):
        assert (out / "data" / name).is_file()
    bundle = load_checkpoint(out / "pretrained")
    assert bundle.model.config.hidden_size == 128 and bundle.vae.config.ch == 8
    summary = json.loads((out / "build.json").read_text())
    assert set(summary["stages"]) == {"data", "vae", "init", "pretrain", "cot", "eval"}
    cot = load_checkpoint(out / "pretrained_cot")  # Self-CoT SFT of the pre-trained model
    assert any(not torch.equal(v, bundle.model.state_dict()[k]) for k, v in cot.model.state_dict().items())
    assert 0.0 <= summary["pretrained_heldout"]["strict"] <= summary["pretrained_heldout"]["partial"] <= 1.0
    assert (out / "samples_pretrained.png").is_file()
    import yaml

    rewards = from_dict(RewardsConfig, yaml.safe_load((out / "rewards.yaml").read_text()))
    assert rewards.rewards[0].family_config().detector == "shapes"
