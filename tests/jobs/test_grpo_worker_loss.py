"""GRPO (soft-value prefix updates: rollouts, then continuations) with a learner rank on Ray and 2 Ray
rollout workers, where rollout workers die (a hard crash: the process exits): one at the start of step
1's rollout, one in the middle of the broadcast of policy 2, one in step 2's continuations. The pool
replaces each, the weight group is formed again with the replacement, what was sampled without the
current policy is sampled again, and the run ends with the metrics and weights of a run where nobody
died. With no restarts left, a death in a sync ends the run in one WorkerLostError."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import jobs.grpo
from alignment.synced_worker import SyncedRolloutWorker
from base_model.checkpoint import load_checkpoint
from core.pools import WorkerLostError
from core.schema import load_config
from jobs.grpo import GrpoConfig, run_grpo
from rollout.batch import rollout_seed
from tests.distributed_helpers import DiesAfter
from tests.jobs.test_grpo_distributed import PROMPTS, ROLLOUT, ROOT, _config, _rows

SOFT_VALUE = ROOT / "configs" / "grpo" / "tiny_soft_value.yaml"  # 3 steps: 3 prefix updates on soft values

ONE_RANK = [*ROLLOUT, "learner_pool.kind=ray", "learner_pool.num_workers=1", "learner_pool.num_cpus_per_worker=0.5",
            "weight_sync.timeout_s=60", "steps=3"]  # fmt: skip
SAME = ("reward/mean", "grpo/soft_value/mean", "grpo/continuation_reward/mean", "train/loss", "grpo/clip_frac",
        "grpo/approx_kl", "train/grad_norm", "grpo/policy_version", "sync/bytes")  # fmt: skip


def _soft_value(tmp_path: Path, name: str) -> GrpoConfig:
    base = [f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}", f"run_name={name}", "micro_batch_samples=4",
            "checkpoint_every=3", "weight_sync.dtype=bfloat16", "weight_sync.bucket_mb=0.1"]  # fmt: skip
    return load_config(GrpoConfig, SOFT_VALUE, [*base, *ONE_RANK])


class DyingWorker(SyncedRolloutWorker):
    """A rollout worker of which the first process to reach `die_in_rollout` (a step; the other worker then
    waits, so the dead one's chunk goes to its replacement), `die_in_sync` (a policy version; after its first
    bucket) or `die_in_continuation` (a policy version) exits, once per marker file in `marker_dir`.
    Subclassed per test (`_dying`) so that Ray ships the settings with the class."""

    marker_dir: str = ""
    die_in_rollout: int | None = None
    die_in_sync: int | None = None
    die_in_continuation: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_seed = self.run_seed

    def claim(self, what: str) -> bool:
        """True for the first process to ask for `what` (an exclusive create)."""
        try:
            os.close(os.open(Path(self.marker_dir) / what, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def rollout_step(self, prompts, samples_per_prompt: int, step_seed: int):
        step = self.die_in_rollout
        if step is not None and step_seed == rollout_seed(self.config_seed, step):
            if self.claim("rollout"):
                os._exit(1)
            time.sleep(5)  # the survivor is busy when the pool re-runs the lost chunk: it goes to the replacement
        return super().rollout_step(prompts, samples_per_prompt, step_seed)

    def continue_prefixes(self, prompts, prefix_tokens, seeds):
        if self.policy_version == self.die_in_continuation and self.claim("continuation"):
            os._exit(1)
        return super().continue_prefixes(prompts, prefix_tokens, seeds)

    def receive_weights(self, version: int) -> int | None:
        if version == self.die_in_sync and self.claim("sync"):
            self.weight_group.group = DiesAfter(self.weight_group.group, 1)
        return super().receive_weights(version)


def _dying(tmp_path: Path, **settings) -> type:
    return type("Dying", (DyingWorker,), {"marker_dir": str(tmp_path), **settings})


@pytest.mark.deepspeed
@pytest.mark.ray
@pytest.mark.slow
def test_workers_lost_in_a_rollout_a_sync_and_continuations_leave_the_run_as_if_nobody_died(
    tmp_path, ray_session, monkeypatch, capsys
):
    whole = run_grpo(_soft_value(tmp_path, "whole"))
    dying = _dying(tmp_path, die_in_rollout=1, die_in_sync=2, die_in_continuation=2)
    monkeypatch.setattr(jobs.grpo, "SyncedRolloutWorker", dying)
    lost = run_grpo(_soft_value(tmp_path, "lost"))
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["continuation", "rollout", "sync"]
    assert out.count("replaced it,") == 3 and out.count("grpo: weight group formed again") == 3
    assert "grpo: step 1: 1 rollout chunk(s) sampled without policy 1 (a replaced worker); sampling them again" in out
    assert "grpo: step 2: a rollout worker was replaced during the continuations; continuing every prefix again" in out
    rows_whole, rows_lost = _rows(whole), _rows(lost)
    assert [r["step"] for r in rows_lost] == [1, 2, 3]
    for a, b in zip(rows_whole, rows_lost):
        assert {k: b[k] for k in SAME} == {k: a[k] for k in SAME}, a["step"]  # exactly: the same samples
    a = load_checkpoint(whole / "step_000003" / "model").model.state_dict()
    b = load_checkpoint(lost / "step_000003" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.deepspeed
@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_lost_in_a_sync_with_no_restarts_left_ends_the_run_in_one_line(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(jobs.grpo, "SyncedRolloutWorker", _dying(tmp_path, die_in_sync=1))
    config = _config(tmp_path, "spent", *ONE_RANK, "rollout.pool.max_restarts=0")
    with pytest.raises(WorkerLostError, match=r"^weight sync of policy 1: a rollout worker died and rollout.pool has "
                                              r"no restarts left \(max_restarts: 0\); the run stops, and resumes "
                                              r"from latest when started again$"):  # fmt: skip
        run_grpo(config)
