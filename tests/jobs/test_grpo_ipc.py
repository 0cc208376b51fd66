"""Colocated GRPO with `weight_sync.transport: ipc` (each learner rank hands its buckets by handle to the
rollout worker on its own GPU; shared memory on a CPU) against the same run over the gloo broadcast: the
same metrics and weights, exactly, even when a worker dies in the middle of a hand-over. The key refused
where it cannot work."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import jobs.grpo
from base_model.checkpoint import load_checkpoint
from core.errors import ConfigError
from jobs.grpo import run_grpo
from tests.jobs.test_grpo_distributed import DISTRIBUTED, _config, _rows
from tests.jobs.test_grpo_worker_loss import SAME, DyingWorker

COLOCATED = [*DISTRIBUTED, "weight_sync.colocated=true"]  # 2 learner ranks + 2 workers, pair i in bundle i


class HandOverDeath(DyingWorker):
    """The first process to take bucket 1 of policy `die_in_sync` exits."""

    def take_bucket(self, version: int, index: int, handle: tuple) -> int | None:
        if version == self.die_in_sync and index == 1 and self.claim("hand_over"):
            os._exit(1)
        return super().take_bucket(version, index, handle)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["weight_sync.transport=nvlink"], "weight_sync.transport: 'broadcast' or 'ipc', got 'nvlink'"),
        ([*DISTRIBUTED, "weight_sync.transport=ipc"], "weight_sync.transport: ipc hands learner rank i's buckets"),
    ],
)
def test_the_transport_key_is_refused_where_it_cannot_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, "bad", *overrides)


@pytest.mark.deepspeed
@pytest.mark.ray
@pytest.mark.slow
def test_ipc_hand_over_equals_the_broadcast_even_with_a_worker_lost_mid_way(tmp_path, ray_session, monkeypatch, capsys):
    broadcast = run_grpo(_config(tmp_path, "broadcast", *COLOCATED))
    dying = type("Dying", (HandOverDeath,), {"marker_dir": str(tmp_path), "die_in_sync": 1})
    monkeypatch.setattr(jobs.grpo, "SyncedRolloutWorker", dying)
    ipc = run_grpo(_config(tmp_path, "ipc", *COLOCATED, "weight_sync.transport=ipc"))
    assert (tmp_path / "hand_over").is_file() and capsys.readouterr().out.count("replaced it,") == 1
    rows_broadcast, rows_ipc = _rows(broadcast), _rows(ipc)
    assert [r["step"] for r in rows_ipc] == [1, 2]
    keys = [k for k in SAME if "soft_value" not in k and "continuation" not in k]
    for a, b in zip(rows_broadcast, rows_ipc):
        assert {k: b[k] for k in keys} == {k: a[k] for k in keys}, a["step"]  # sync/bytes too: the policy once
    a = load_checkpoint(broadcast / "step_000002" / "model").model.state_dict()
    b = load_checkpoint(ipc / "step_000002" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- on a CUDA GPU (`pytest -m gpu tests/jobs/test_grpo_ipc.py`) ---------------------------------------------


class CudaBucketPeer:
    """One end of a colocated pair: a learner rank shares a CUDA bucket, its worker maps it by handle."""

    def share(self) -> tuple:
        from alignment.weight_sync import share_bucket

        self.bucket = torch.arange(256, dtype=torch.bfloat16, device="cuda")  # alive until the worker took it
        return share_bucket(self.bucket)

    def take(self, handle: tuple) -> tuple[list[float], int]:
        from alignment.weight_sync import open_bucket

        flat = open_bucket(handle, "cuda")
        return flat.float().cpu().tolist(), len(pickle.dumps(handle))


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_colocated_pair_on_one_gpu_hands_a_bucket_over_by_cuda_ipc(ray_session):
    from core.pools import PoolConfig, make_pool, reserve_shared
    from core.rank_group import RankGroup
    from core.schema import from_dict

    def pool(where: str) -> PoolConfig:
        keys = {"kind": "ray", "num_cpus_per_worker": 0.5, "num_gpus_per_worker": 0.5, "ready_timeout_s": 120}
        return from_dict(PoolConfig, keys, where)

    learner, rollout = pool("learner_pool"), pool("rollout.pool")
    shared = reserve_shared([learner, rollout])  # one bundle {CPU: 1, GPU: 1}
    try:
        workers = make_pool(CudaBucketPeer, (), rollout, bundles=shared)
        ranks = RankGroup(CudaBucketPeer, (), learner, bundles=shared)
        assert ranks.placements()[0].gpu_ids == workers.placements()[0].gpu_ids
        handles = ranks.call_all("share")
        ((values, size),) = workers.call_each_or_replace("take", [(h,) for h in handles])
        assert values == [float(i) for i in range(256)] and size < 2048  # a handle, not the 512 B
        ranks.shutdown()
        workers.shutdown()
    finally:
        shared.release()
