"""GRPO with its learner as 2 Ray ranks (data-parallel over the micro batches) and 2 Ray rollout workers
that take bf16 weights by torch.distributed broadcast, against the same rollout workers fed by the one
learner in the driver; the micro-batch shares by hand; the placement keys refused in one line."""

import json
from pathlib import Path

import pytest
import torch

from alignment.grpo_learner import micro_share
from base_model.checkpoint import load_checkpoint
from core.errors import CheckpointError, ConfigError
from core.pools import PoolConfig
from core.rank_group import RankGroup
from core.schema import load_config
from jobs.grpo import GrpoConfig, run_grpo

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "grpo" / "tiny.yaml"
PROMPTS = ROOT / "configs" / "grpo" / "prompts_tiny.txt"
POLICY_BF16_BYTES = 199296 * 2  # the tiny policy's numel x 2 B
ROLLOUT = [
    "rollout.pool.kind=ray",
    "rollout.pool.num_workers=2",
    "rollout.pool.num_cpus_per_worker=0.5",
    "rollout.num_threads=1",
]  # both runs sample alike: only the learner differs
DISTRIBUTED = [*ROLLOUT, "learner_pool.kind=ray", "learner_pool.num_workers=2", "learner_pool.num_cpus_per_worker=0.5"]


def _config(tmp_path, name: str, *overrides: str) -> GrpoConfig:
    # 2 prompts x 4 samples in micro batches of 4: two micro batches, one per learner rank
    base = [f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}", f"run_name={name}", "steps=2",
            "micro_batch_samples=4", "checkpoint_every=1", "weight_sync.dtype=bfloat16",
            "weight_sync.bucket_mb=0.1"]  # fmt: skip
    return load_config(GrpoConfig, TINY, [*base, *overrides])


def _rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_micro_share_pads_every_rank_to_the_same_count_and_weights_the_mean_back():
    assert micro_share(4, 0, 1) == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert micro_share(4, 1, 2) == [(2, 1.0), (3, 1.0)]
    # 3 micro batches on 2 ranks: 2 slots each, the last one padding; real ones weigh 2 x 2 / 3
    assert micro_share(3, 0, 2) == [(0, 4 / 3), (1, 4 / 3)]
    assert micro_share(3, 1, 2) == [(2, 4 / 3), (0, 0.0)]
    # the Learner's mean over slots then ranks of w * x equals the plain mean of x over the 3
    x = [3.0, 5.0, 10.0]
    per_rank = [sum(w * x[i] for i, w in micro_share(3, r, 2)) / 2 for r in range(2)]
    assert sum(per_rank) / 2 == pytest.approx(6.0)
    assert micro_share(1, 1, 2) == [(0, 0.0)]


class _Env:
    """A stand-in for a learner rank: what a launcher would have told it."""

    def __init__(self, tag: str):
        import os

        self.tag, self.env = tag, {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT", "GLOO_SOCKET_IFNAME")}  # fmt: skip

    def seen(self) -> tuple[str, dict]:
        return self.tag, self.env

    def refuse(self) -> None:
        raise CheckpointError(f"rank {self.env['RANK']}: nothing to resume")


@pytest.mark.ray
def test_rank_group_gives_each_actor_its_rank_and_one_rendezvous(ray_session):
    group = RankGroup(_Env, ("x",), PoolConfig(kind="ray", num_workers=2, num_cpus_per_worker=0.5))
    try:
        (tag0, env0), (tag1, env1) = group.call_all("seen")
        assert (tag0, tag1) == ("x", "x") and group.master_addr == "127.0.0.1"
        assert [env0["RANK"], env1["RANK"]] == ["0", "1"] and env0["WORLD_SIZE"] == env1["WORLD_SIZE"] == "2"
        assert env0["MASTER_PORT"] == env1["MASTER_PORT"] and env0["MASTER_ADDR"] == env1["MASTER_ADDR"] == "127.0.0.1"
        assert env0["LOCAL_RANK"] == "0" and env0["GLOO_SOCKET_IFNAME"] == "lo"
        with pytest.raises(CheckpointError, match=r"^rank [01]: nothing to resume$"):  # a rank's UserError, itself
            group.call_all("refuse")
    finally:
        group.shutdown()
    with pytest.raises(ConfigError, match=r"^learner_pool: 2 learner ranks x 1 GPU = 2 GPU requested, the Ray cluster "
                                          r"has 0 GPU"):  # fmt: skip
        RankGroup(_Env, ("x",), PoolConfig(kind="ray", num_workers=2, num_gpus_per_worker=1, ready_timeout_s=5))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learner_pool.num_workers=2"], "learner_pool.num_workers: 2 learner ranks need learner_pool.kind: ray"),
        (["learner_pool.kind=ray"], "rollout.pool.kind: learner ranks on Ray broadcast weights"),
        (["weight_sync.colocated=true"], "weight_sync.colocated: pairs learner rank i with rollout worker i"),
        (["weight_sync.dtype=fp8"], "weight_sync.dtype: one of rollout, bfloat16, float16, float32, got 'fp8'"),
        (
            [
                *DISTRIBUTED,
                "weight_sync.colocated=true",
                "learner_pool.num_gpus_per_worker=1",
                "rollout.pool.num_gpus_per_worker=0.5",
            ],
            "their num_gpus_per_worker sum to 1.5 (> 1)",
        ),  # fmt: skip
    ],
)
def test_placement_keys_that_cannot_work_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, "bad", *overrides)


@pytest.mark.deepspeed
@pytest.mark.ray
@pytest.mark.slow
def test_two_learner_ranks_and_two_rollout_workers_equal_one_process_and_resume(tmp_path, ray_session):
    one = run_grpo(_config(tmp_path, "one", *ROLLOUT))  # the learner in the driver, world size 1
    # the distributed run stops after step 1, then the same command resumes it from `latest`
    run_grpo(_config(tmp_path, "two", *DISTRIBUTED, "steps=1"))
    two = run_grpo(_config(tmp_path, "two", *DISTRIBUTED))
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [1, 2] and [r["grpo/policy_version"] for r in rows_two] == [1, 2]
    for key in ("reward/mean", "train/loss", "grpo/clip_frac", "grpo/kl", "grpo/approx_kl", "train/grad_norm"):
        for a, b in zip(rows_one, rows_two):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    for rows in (rows_one, rows_two):  # bf16 on the wire, once per sync whatever the number of workers
        assert [r["sync/bytes"] for r in rows] == [POLICY_BF16_BYTES] * 2
        assert all(0 < r["sync/fraction_of_step"] < 1 for r in rows)
    a = load_checkpoint(one / "step_000002" / "model").model.state_dict()
    b = load_checkpoint(two / "step_000002" / "model").model.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert (two / "latest").read_text().strip() == "step_000002"
    assert (
        len(list((two / "step_000002" / "engine" / "state").glob("*optim_states.pt"))) == 2
    )  # a ZeRO-2 shard per rank
