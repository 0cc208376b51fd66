"""`nsalign grpo` on the tiny preset, DeepSpeed world 1 on CPU: trained-part weights, end to end,
resume exactness, a Ray rollout pool and config errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignment.learner import StepResult
from alignment.train_parts import TrainPartConfig, prefix_values, soft_value_phase, train_weights
from base_model.checkpoint import load_checkpoint
from base_model.sampler import SamplingConfig
from core.errors import ConfigError
from core.runs import TrainerState
from core.schema import load_config
from jobs.cli import main
from jobs.grpo import GrpoConfig, GrpoTrainer, precision_note, run_grpo
from rollout.batch import RolloutBatch, continuation_seeds, rollout_seed
from rollout.worker import group_chunks, split_prompts

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "grpo" / "tiny.yaml"
SOFT_VALUE = ROOT / "configs" / "grpo" / "tiny_soft_value.yaml"
PROMPTS = ROOT / "configs" / "grpo" / "prompts_tiny.txt"


def _config(tmp_path, name: str, *overrides: str) -> GrpoConfig:
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
    assert group_chunks(12, 4, 2) == [(0, 4), (4, 12)] or group_chunks(12, 4, 2) == [(0, 8), (8, 12)]


def test_soft_value_of_continuations_by_hand():
    values, metrics = prefix_values(torch.tensor([[0.0, math.log(3)], [1.0, 1.0], [2.0, 0.0]]), eta=1.0)
    expected = [math.log(2), 1.0, math.log((math.e**2 + 1) / 2)]  # log mean exp: log((1 + 3) / 2), 1, ...
    torch.testing.assert_close(values, torch.tensor(expected))
    assert metrics["grpo/continuation_reward/mean"] == pytest.approx((math.log(3) + 4) / 6)
    assert metrics["grpo/soft_value/mean"] == pytest.approx(sum(expected) / 3)
    cooler, _ = prefix_values(torch.tensor([[0.0, 2 * math.log(3)]]), eta=2.0)  # 2 log((1 + 3) / 2)
    assert cooler.item() == pytest.approx(2 * math.log(2))
    part = TrainPartConfig(kind="token_prefix", prefix=1, alternate=True, soft_value_samples=2)
    assert [soft_value_phase(part, i) for i in range(5)] == [True, True, True, False, True]  # 3 prefix, 1 suffix
    assert not soft_value_phase(TrainPartConfig(kind="token_prefix", prefix=1), 0)  # off by default
    seeds = continuation_seeds(torch.tensor([5, 6]), 2, run_seed=0, step=3)
    assert seeds.shape == (2, 2) and len(set(seeds.flatten().tolist())) == 4
    assert torch.equal(seeds, continuation_seeds(torch.tensor([5, 6]), 2, 0, 3))  # the same after a resume
    assert not torch.equal(seeds, continuation_seeds(torch.tensor([5, 6]), 2, 0, 4))  # fresh every step


class _RecordingLearner:
    def __init__(self):
        self.advantages = []

    def step(self, micro, loss_fn):
        self.advantages.append(torch.cat([m.advantages for m in micro]))
        return StepResult(updated=True, metrics={"train/grad_norm": 0.0})


def test_update_trains_the_prefix_on_soft_values_and_the_suffix_on_rewards():
    """One group of G = 2 with equal rewards [1, 1] but soft values [log 2, 0] (continuations [0, log 3]
    and [0, 0]): prefix updates see A = +-(log2/2) / (log2/2 + 1e-4); the suffix update drops the group."""
    trainer = GrpoTrainer.__new__(GrpoTrainer)  # only the update path: no pools, no model
    trainer.config = load_config(GrpoConfig, SOFT_VALUE, ["samples_per_prompt=2", "prompts_per_step=1",
                                                       "micro_batch_samples=2", "inner_epochs=2"])  # fmt: skip
    trainer.learner, trainer.state = _RecordingLearner(), TrainerState(step=1)  # updates 2 (prefix), 3 (suffix)
    batch = RolloutBatch(
        prompts=["a", "a"], prompt_ids=["x", "x"], group_ids=torch.zeros(2, dtype=torch.long),
        seeds=torch.tensor([1, 2]), tokens=torch.zeros(2, 16, 64), chains=torch.zeros(2, 16, 5, 64),
        log_probs=torch.zeros(2, 16, 4), images=torch.zeros(2, 3, 64, 64, dtype=torch.uint8), policy_version=0,
        sampling=SamplingConfig(image_size=64, num_head_steps=4),
    )  # fmt: skip
    values, _ = prefix_values(torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]), eta=1.0)
    result = trainer.update(batch, torch.tensor([1.0, 1.0]), values)
    metrics = result.metrics
    assert result.updated
    a = (math.log(2) / 2) / (math.log(2) / 2 + 1e-4)
    assert len(trainer.learner.advantages) == 1  # the suffix update had no group left
    torch.testing.assert_close(trainer.learner.advantages[0], torch.tensor([a, -a]))
    assert metrics["grpo/kept_groups"] == 0.0  # the last update's filter (suffix, rewards [1, 1])


# -- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], "unknown key 'stepz'"),
        (["sampling.sde_kind=ode"], "sampling.sde_kind"),
        (["sampling.cfg_scale=3.0"], "train_with_guidance: sampling.cfg_scale=3.0 samples the guided policy"),
        (["micro_batch_samples=3"], "micro_batch_samples: 3 does not split"),
        (["beta=high"], "beta: expected a number"),
        (["kl_scale=flowgrpo"], "kl_scale: 'exact' or 'flow_grpo', got 'flowgrpo'"),
        (["advantage_scale=global"], "advantage_scale: 'group', 'global_std', 'batch' or 'none'"),
        (["train_part.kind=step_prefix", "train_part.prefix=9"], "train_part.prefix"),
        (["prompts=nowhere.txt"], "prompt file not found"),
        (["train_part.soft_value_sample=2"], "train_part: unknown key 'soft_value_sample'"),
        (["train_part.soft_value_samples=2"], "train_part.soft_value_samples: continuations need a trajectory"),
        (["train_part.soft_value_samples=-1"], "train_part.soft_value_samples: must be >= 0"),
        (["train_part.soft_value_samples=two"], "train_part.soft_value_samples"),
        (
            [
                "train_part.kind=token_prefix",
                "train_part.prefix=2",
                "train_part.soft_value_samples=2",
                "train_part.soft_value_eta=0",
            ],
            "train_part.soft_value_eta: must be > 0",
        ),
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
    straight = run_grpo(_config(tmp_path, "straight"))
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first = rows[0]
    assert first["grpo/logprob_diff"] < 1e-4  # untouched policy: the learner re-scores what was sampled
    for key in ("reward/jpeg/mean", "reward/jpeg/std", "reward/mean", "grpo/zero_std_group_ratio",
                "grpo/kept_groups", "grpo/clip_frac", "grpo/approx_kl", "grpo/kl", "train/grad_norm",
                "train/lr", "samples/s", "time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s"):  # fmt: skip
        assert key in first, key
    assert [r["grpo/policy_version"] for r in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_000002", "step_000004"]
    assert (straight / "latest").read_text().strip() == "step_000004"
    state = json.loads((straight / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["policy_version"] == 4 and state["consumed_prompts"] == 8

    partial = run_grpo(_config(tmp_path, "resumed", "steps=2"))
    run_grpo(_config(tmp_path, "resumed"))  # the same run continued to 4 steps
    a = load_checkpoint(straight / "step_000004" / "model").model.state_dict()
    b = load_checkpoint(partial / "step_000004" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = _rows(partial)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["reward/mean"] for r in resumed] == [r["reward/mean"] for r in rows]


@pytest.mark.deepspeed
@pytest.mark.ray
def test_ray_rollout_pool_with_two_actors(tmp_path, ray_session):  # the session's Ray (2 CPUs)
    ray_run = run_grpo(_config(tmp_path, "ray", "steps=2", "rollout.pool.kind=ray", "rollout.pool.num_workers=2",
                            "rollout.pool.num_cpus_per_worker=1"))  # fmt: skip
    rows = _rows(ray_run)
    assert [r["step"] for r in rows] == [1, 2] and (ray_run / "step_000002" / "model").is_dir()
    assert rows[0]["grpo/logprob_diff"] < 1e-4


@pytest.mark.deepspeed
def test_soft_value_run_logs_its_metrics_in_prefix_updates_only(tmp_path):
    args = [f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}", "run_name=soft", "steps=2",
            "train_part.prefix_updates=1"]  # fmt: skip
    run = run_grpo(load_config(GrpoConfig, SOFT_VALUE, args))  # a prefix update, then a suffix update
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and [r["grpo/policy_version"] for r in rows] == [1, 2]
    for row in rows[:1]:
        for key in ("grpo/soft_value/mean", "grpo/soft_value/std", "grpo/continuation_reward/mean",
                    "time/soft_value_s"):  # fmt: skip
            assert key in row, key
        assert row["grpo/soft_value/mean"] >= row["grpo/continuation_reward/mean"] - 1e-6  # log-mean-exp >= mean
    assert "grpo/soft_value/mean" not in rows[1] and "time/soft_value_s" not in rows[1]  # suffix: no continuations
    assert rows[0]["grpo/logprob_diff"] < 1e-4


def test_precision_note_warns_only_when_rollout_and_learner_dtypes_differ(tmp_path):
    assert precision_note(_config(tmp_path, "same")) is None  # float32 rollouts, fp32 learner
    note = precision_note(_config(tmp_path, "mixed", "rollout.dtype=bfloat16"))
    assert note.startswith("grpo: warning: rollout.dtype bfloat16 but the learner runs in float32") and "\n" not in note
    assert precision_note(_config(tmp_path, "both", "rollout.dtype=bfloat16", "learner.bf16=true")) is None


@pytest.mark.deepspeed
def test_cps_with_kl_trains_and_logs_the_on_policy_clip_share(tmp_path, capsys):
    """The issue's repro (`sampling.sde_kind=cps`, beta 0.01) used to stop on non-finite losses at the
    last CPS step (std 0); now every step updates, the KL is finite, and step 0's clipped share is logged."""
    run = run_grpo(_config(tmp_path, "cps", "steps=2", "sampling.sde_kind=cps"))
    rows = _rows(run)
    assert [r["grpo/policy_version"] for r in rows] == [1.0, 2.0] and all(
        r["train/skipped_nonfinite"] == 0 for r in rows
    )
    assert all(math.isfinite(r["grpo/kl"]) for r in rows) and rows[1]["grpo/kl"] > 0
    assert rows[0]["grpo/clip_frac_on_policy"] == 0.0  # fp32 rollouts and learner agree
    assert "grpo: step 0, before any update: 0.0% of trained cells clipped" in capsys.readouterr().out


@pytest.mark.parametrize(("old", "new"), [("rollout_pool", "rollout.pool"), ("reward_pool", "rewards.pool")])
def test_the_old_pool_keys_name_their_new_place(tmp_path, old, new):
    with pytest.raises(ConfigError, match=rf"\.{old}: this key is now {new} \(move its value there\)$"):
        _config(tmp_path, "old", f"{old}={{kind: local}}")
