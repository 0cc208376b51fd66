"""Run directories: config guard, atomic latest pointer, keep-last-N, RNG round trip, metrics."""

import json
import random

import pytest
import torch

from core.errors import CheckpointError, UserError
from core.runs import (
    MetricsLogger,
    TrainerState,
    checkpoint_dir,
    finish_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    prepare_run_dir,
)


def test_config_guard(tmp_path):
    run = prepare_run_dir(tmp_path, "r", {"lr": 1e-5, "steps": 4})
    assert prepare_run_dir(tmp_path, "r", {"steps": 4, "lr": 1e-5}) == run  # same config: resume
    with pytest.raises(UserError, match="differs in lr"):
        prepare_run_dir(tmp_path, "r", {"lr": 2e-5, "steps": 4})
    prepare_run_dir(tmp_path, "r", {"lr": 1e-5, "steps": 8})  # continuing for more steps is allowed


def test_latest_pointer_keep_last_and_rng_roundtrip(tmp_path):
    run = prepare_run_dir(tmp_path, "r", {})
    assert latest_checkpoint(run) is None
    for step in (1, 2, 3):
        d = checkpoint_dir(run, step)
        d.mkdir()
        finish_checkpoint(run, d, TrainerState(step=step, consumed_prompts=10 * step), keep_last=2)
    assert latest_checkpoint(run).name == "step_000003"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002", "step_000003"]
    expected_next = torch.rand(3)  # what the RNG gives right after the step-3 checkpoint
    torch.rand(5)
    random.random()
    state = load_trainer_state(latest_checkpoint(run))
    assert (state.step, state.consumed_prompts) == (3, 30)
    assert torch.equal(torch.rand(3), expected_next)
    # an incomplete checkpoint (no trainer state) is never pointed at
    checkpoint_dir(run, 4).mkdir()
    assert latest_checkpoint(run).name == "step_000003"
    (run / "latest").write_text("step_000004\n")
    with pytest.raises(UserError, match="incomplete"):
        latest_checkpoint(run)


def test_metrics_jsonl_and_truncate_on_resume(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 5):
        log.log(step, {"train/loss": step * 0.5, "grpo/clip_frac": 0.0})
    log.truncate_after(2)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 1.0
    log.close()
    assert list((tmp_path / "tensorboard").iterdir())


def test_trainer_state_counters_are_typed_and_old_files_with_extra_still_load(tmp_path):
    """trainer_state.json of earlier versions kept DPO's pair position and GRPO's reward state under
    `extra`; they load into the typed fields, so those runs resume."""
    step_dir = tmp_path / "step_000004"
    step_dir.mkdir()
    old = {"step": 4, "policy_version": 4, "consumed_prompts": 8, "num_skipped_steps": 1,
           "extra": {"consumed_pairs": 32, "reward_state": {"jpeg": {"count": 16}}}}  # fmt: skip
    (step_dir / "trainer_state.json").write_text(json.dumps(old))
    state = load_trainer_state(step_dir)
    assert state == TrainerState(step=4, policy_version=4, consumed_prompts=8, consumed_pairs=32,
                                 num_skipped_steps=1, reward_state={"jpeg": {"count": 16}})  # fmt: skip
    (step_dir / "trainer_state.json").write_text(json.dumps({**old, "extra": {"unknown": 1}}))
    with pytest.raises(CheckpointError, match="not a trainer state"):
        load_trainer_state(step_dir)


def test_metrics_are_named_area_slash_name(tmp_path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train/loss": 0.5})
    with pytest.raises(ValueError, match=r"\['policy_version', '/x'\]"):
        logger.log(2, {"train/loss": 0.4, "policy_version": 1.0, "/x": 2.0})
    logger.close()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["train/loss"] == 0.5


def test_a_resume_after_an_upgrade_reads_missing_keys_as_their_defaults(tmp_path):
    from core.runs import prepare_run_dir

    old_era = {"steps": 10, "sampling": {"image_size": 64}}  # written before sampling.self_cot existed
    prepare_run_dir(tmp_path, "run", old_era)
    defaults = {"steps": 1, "sampling": {"image_size": 512, "self_cot": False}}
    now = {"steps": 10, "sampling": {"image_size": 64, "self_cot": False}}
    assert prepare_run_dir(tmp_path, "run", now, defaults=defaults) == tmp_path / "run"  # the default: same run
    prepare_run_dir(tmp_path / "b", "run", old_era)
    changed = {"steps": 10, "sampling": {"image_size": 64, "self_cot": True}}
    with pytest.raises(UserError, match="differs in sampling"):
        prepare_run_dir(tmp_path / "b", "run", changed, defaults=defaults)
