"""`nsalign grpo` on the tiny preset, DeepSpeed world 1 on CPU: trained-part weights, end to end,
resume exactness, a Ray rollout pool and config errors."""

import json
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.grpo_parts import TrainPartConfig, rollout_seed, split_prompts, train_weights
from alignment.jobs.grpo import GrpoConfig, _group_chunks, run_grpo
from base_model.checkpoint import load_checkpoint
from base_model.schema import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "grpo" / "tiny.yaml"
PROMPTS = ROOT / "configs" / "grpo" / "prompts_tiny.txt"


def _cfg(tmp_path, name: str, *overrides: str) -> GrpoConfig:
    base = [f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}", f"run_name={name}", "steps=4"]
    return load_config(GrpoConfig, TINY, [*base, *overrides])


def _rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


# -- pure pieces -------------------------------------------------------------------------------


def test_train_weights_prefix_alternation_window_and_timestep_fraction():
    part = TrainPartConfig(kind="step_prefix", prefix=1, alpha=0.0, alternate=True, prefix_updates=3, suffix_updates=1)
    assert train_weights(part, 2, 4, step=0, timestep_fraction=1.0, seed=0).tolist() == [[1, 0, 0, 0]] * 2
    assert train_weights(part, 2, 4, step=3, timestep_fraction=1.0, seed=0).tolist() == [[0, 1, 1, 1]] * 2
    token = TrainPartConfig(kind="token_prefix", prefix=1, alpha=1.0)
    assert train_weights(token, 2, 4, 0, 1.0, 0).tolist() == [[0.25] * 4, [0.0] * 4]  # 1 / n_t, n_t = 4
    window = TrainPartConfig(kind="step_window", window_start=0, window=2, window_slide_every=2, alpha=0.0)
    assert train_weights(window, 1, 4, step=2, timestep_fraction=1.0, seed=0).tolist() == [[0, 1, 1, 0]]
    full = TrainPartConfig(alpha=0.0)
    a = train_weights(full, 3, 10, step=5, timestep_fraction=0.6, seed=0)
    assert (a.sum(dim=1) == 6).all() and (a == a[0]).all()  # 6 of 10 head steps, the same for every token
    assert torch.equal(a, train_weights(full, 3, 10, step=5, timestep_fraction=0.6, seed=0))  # seeded
    assert not torch.equal(a, train_weights(full, 3, 10, step=6, timestep_fraction=0.6, seed=0))


def test_rollout_seed_and_chunks():
    assert rollout_seed(0, 1) != rollout_seed(0, 2) and rollout_seed(0, 1) == rollout_seed(0, 1)
    assert [len(c) for c in split_prompts(list(range(5)), 2)] == [3, 2]
    assert _group_chunks(12, 4, 2) == [(0, 4), (4, 12)] or _group_chunks(12, 4, 2) == [(0, 8), (8, 12)]


# -- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], "unknown key 'stepz'"),
        (["sampling.sde_kind=ode"], "sampling.sde_kind"),
        (["micro_batch_samples=3"], "micro_batch_samples: 3 does not split"),
        (["beta=high"], "beta: expected a number"),
        (["train_part.kind=step_prefix", "train_part.prefix=9"], "train_part.prefix"),
        (["prompts=nowhere.txt"], "prompt file not found"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, overrides, message):
    runs = tmp_path / "runs"
    args = ["grpo", str(TINY), f"runs_root={runs}", f"prompts={PROMPTS}", *overrides]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsalign grpo: error:") and message in err and "\n" not in err
    assert not runs.exists()


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.deepspeed
def test_resume_equals_a_straight_run_and_health_metrics(tmp_path):
    straight = run_grpo(_cfg(tmp_path, "straight"))
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first = rows[0]
    assert first["grpo/logprob_diff"] < 1e-4  # untouched policy: the learner re-scores what was sampled
    for key in ("reward/jpeg/mean", "reward/jpeg/std", "reward/mean", "grpo/zero_std_group_ratio",
                "grpo/kept_groups", "grpo/clip_frac", "grpo/approx_kl", "grpo/kl", "train/grad_norm",
                "train/lr", "samples/s", "time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s"):  # fmt: skip
        assert key in first, key
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_000002", "step_000004"]
    assert (straight / "latest").read_text().strip() == "step_000004"
    state = json.loads((straight / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["policy_version"] == 4 and state["consumed_prompts"] == 8

    partial = run_grpo(_cfg(tmp_path, "resumed", "steps=2"))
    run_grpo(_cfg(tmp_path, "resumed"))  # the same run continued to 4 steps
    a = load_checkpoint(straight / "step_000004" / "model").model.state_dict()
    b = load_checkpoint(partial / "step_000004" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = _rows(partial)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["reward/mean"] for r in resumed] == [r["reward/mean"] for r in rows]


@pytest.mark.deepspeed
@pytest.mark.ray
def test_ray_rollout_pool_with_two_actors(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ray_run = run_grpo(_cfg(tmp_path, "ray", "steps=2", "rollout_pool.kind=ray", "rollout_pool.num_workers=2",
                                "rollout_pool.num_cpus_per_worker=1"))  # fmt: skip
    finally:
        ray.shutdown()
    rows = _rows(ray_run)
    assert [r["step"] for r in rows] == [1, 2] and (ray_run / "step_000002" / "model").is_dir()
    assert rows[0]["grpo/logprob_diff"] < 1e-4
