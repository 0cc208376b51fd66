"""Colocated GRPO: learner rank i and rollout worker i in bundle i of ONE placement group (Ray's own
placement info says so), the same numbers as the split run, and a request the cluster cannot hold ends
in one line (exit 2); the bundle arithmetic and the pairing check by hand."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.placement import ActorPlacement, bundle_index_of, unpaired
from core.pools import PoolConfig, make_pool, reserve_shared, shared_bundle
from core.rank_group import RankActor, RankGroup
from core.schema import from_dict
from jobs.grpo import GrpoTrainer
from tests.hardening.helpers import BadInput, run_bad_input
from tests.jobs.test_grpo_distributed import DISTRIBUTED, TINY, _config, _rows

GROUP = "5cec289c27d568bbe744877cbfef01000000"  # a placement group id as Ray writes it
COLOCATED = [*DISTRIBUTED, "weight_sync.colocated=true"]  # 2 ranks + 2 workers, 0.5 CPU each: 2 bundles of 1 CPU


def _pool(where: str, **keys) -> PoolConfig:
    return from_dict(PoolConfig, {"kind": "ray", **keys}, where)


# -- by hand -------------------------------------------------------------------------------------------------


def test_a_shared_bundle_holds_one_actor_of_each_pool():
    learner = _pool("learner_pool", num_cpus_per_worker=4, num_gpus_per_worker=0.45)
    rollout = _pool("rollout.pool", num_cpus_per_worker=2, num_gpus_per_worker=0.45)
    assert shared_bundle([learner, rollout]) == {"CPU": 6.0, "GPU": pytest.approx(0.9)}
    with pytest.raises(ConfigError, match=r"^learner_pool \+ rollout.pool: colocated pools need equal num_workers, "
                                          r"got \[2, 1\]$"):  # fmt: skip
        reserve_shared([_pool("learner_pool", num_workers=2), _pool("rollout.pool", num_workers=1)])


def test_the_bundle_index_is_read_from_rays_resource_names():
    names = [f"bundle_group_1_{GROUP}", f"CPU_group_1_{GROUP}", f"CPU_group_{GROUP}", f"bundle_group_{GROUP}"]
    assert bundle_index_of(names, GROUP) == 1
    assert bundle_index_of([f"GPU_group_12_{GROUP}", f"CPU_group_12_{GROUP}"], GROUP) == 12
    assert bundle_index_of([f"CPU_group_{GROUP}"], GROUP) is None  # the group-wide name carries no index
    assert bundle_index_of([f"CPU_group_1_{GROUP}"], "ab" + GROUP[2:]) is None  # another group's bundle


def test_unpaired_names_the_pairs_that_do_not_share_a_bundle_node_and_gpu():
    def at(bundle: int | None, gpu: str = "0", node: str = "n1", group: str | None = GROUP) -> ActorPlacement:
        return ActorPlacement(group, bundle, node, (gpu,))

    learners = [at(0, "0"), at(1, "1"), at(2, "2"), at(3, "3"), at(None, "4", group=None)]
    workers = [at(0, "0"), at(1, "5"), at(3, "2"), at(3, "3", node="n2"), at(None, "4", group=None)]
    assert unpaired(learners, workers) == [1, 2, 3, 4]  # GPU, bundle, node differ; no group at all


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["weight_sync.backend=nccl"], "weight_sync.backend: nccl cannot hold two ranks on one GPU"),
        (["learner_pool.num_workers=1"], "weight_sync.colocated: pairs learner rank i with rollout worker i"),
    ],
)
def test_colocated_keys_that_cannot_work_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, "bad", *COLOCATED, *overrides)


def test_colocated_weights_go_over_gloo_even_from_cuda_workers(tmp_path):
    split = _config(tmp_path, "split", *DISTRIBUTED)
    colocated = _config(tmp_path, "colocated", *COLOCATED)
    for config in (split, colocated):
        config.rollout.device = "cuda"  # the property only reads the key: no GPU needed
    assert (split.sync_backend, colocated.sync_backend) == ("nccl", "gloo")


# -- on a local Ray of 2 CPUs ------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_pool_and_a_rank_group_share_one_group_bundle_by_bundle(ray_session):
    import ray

    learner = _pool("learner_pool", num_workers=2, num_cpus_per_worker=0.5, ready_timeout_s=120)
    rollout = _pool("rollout.pool", num_workers=2, num_cpus_per_worker=0.5, ready_timeout_s=120)
    shared = reserve_shared([learner, rollout])
    try:  # light actors (core imports only): where Ray puts them is all that matters
        workers = make_pool(RankActor, (), rollout, bundles=shared)
        ranks = RankGroup(dict, (), learner, bundles=shared)
        by_rank, by_worker = ranks.placements(), workers.placements()  # from inside each actor
        assert [p.bundle_index for p in by_rank] == [p.bundle_index for p in by_worker] == [0, 1]
        assert {p.group_id for p in by_rank + by_worker} == {shared.group.id.hex()}
        assert unpaired(by_rank, by_worker) == []
        ranks.shutdown()
        workers.shutdown()
        assert ray.util.placement_group_table(shared.group)["state"] == "CREATED"  # the pools leave it
    finally:
        shared.release()
    assert ray.util.placement_group_table(shared.group)["state"] == "REMOVED"


@pytest.mark.ray
def test_a_colocated_request_the_cluster_cannot_hold_exits_2_in_one_line(tmp_path, capsys, ray_session):
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)  # 0 here; the GPU machine has fewer than 4
    pairs = ["learner_pool.num_gpus_per_worker=0.5", "rollout.pool.num_gpus_per_worker=0.5",
             "learner_pool.ready_timeout_s=30", "rollout.pool.ready_timeout_s=30"]  # fmt: skip
    argv = ["grpo", str(TINY), f"runs_root={tmp_path / 'runs'}", *COLOCATED, *pairs,
            "learner_pool.num_workers=4", "rollout.pool.num_workers=4"]  # fmt: skip
    message = (f"{TINY}.learner_pool + {TINY}.rollout.pool: 4 learner/rollout pairs x 1 GPU = 4 GPU requested, "
               f"the Ray cluster has {gpus:g} GPU (it can never fit)")  # fmt: skip
    run_bad_input(BadInput("colocated", argv, message, [tmp_path]), capsys)
    assert [g for g in ray.util.placement_group_table().values() if g["state"] not in ("CREATED", "REMOVED")] == []


class RecordingTrainer(GrpoTrainer):
    """The GRPO job, keeping what Ray says about where its learner ranks and rollout workers run."""

    def check_colocated(self) -> None:
        self.seen = (self.remote.ranks.placements(), self.rollout_pool.placements(), self.shared.group.id.hex())
        self.group = self.shared.group
        super().check_colocated()


@pytest.mark.deepspeed
@pytest.mark.ray
@pytest.mark.slow
def test_colocated_grpo_pairs_each_rank_with_its_worker_and_equals_the_split_run(tmp_path, capsys, ray_session):
    import ray

    split = GrpoTrainer(_config(tmp_path, "split", *DISTRIBUTED)).run()
    trainer = RecordingTrainer(_config(tmp_path, "colocated", *COLOCATED))
    colocated = trainer.run()
    ranks, workers, group = trainer.seen
    assert [(p.group_id, p.bundle_index) for p in ranks] == [(group, 0), (group, 1)]
    assert [(p.group_id, p.bundle_index) for p in workers] == [(group, 0), (group, 1)]
    assert "grpo: colocated: learner rank i and rollout worker i share bundle i" in capsys.readouterr().out
    assert trainer.shared is None and ray.util.placement_group_table(trainer.group)["state"] == "REMOVED"
    rows_split, rows_colocated = _rows(split), _rows(colocated)
    assert [r["step"] for r in rows_colocated] == [1, 2]
    assert [r["grpo/policy_version"] for r in rows_colocated] == [1, 2]
    for key in ("reward/mean", "train/loss", "grpo/clip_frac", "grpo/kl", "grpo/approx_kl", "train/grad_norm",
                "sync/bytes"):  # fmt: skip
        for a, b in zip(rows_split, rows_colocated):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    for row in rows_colocated:  # releases timed; nothing reserved on a CPU
        assert row["time/release_s"] > 0
        assert row["colocated/rollout_reserved_gib"] == row["colocated/learner_reserved_gib"] == 0.0
    assert all("time/release_s" not in r and "colocated/learner_reserved_gib" not in r for r in rows_split)


# -- on a CUDA GPU (`pytest -m gpu tests/jobs/test_grpo_colocated.py`) --------------------------------------


class CudaPeer:
    """One end of a gloo weight group, on whatever GPU Ray gives its actor."""

    def host(self, world_size: int) -> int:
        from alignment.weight_sync import WeightGroup

        self.weights = WeightGroup.host_store("127.0.0.1", world_size, timeout_s=60)
        return self.weights.port

    def connect(self, port: int, world_size: int) -> None:
        from alignment.weight_sync import WeightGroup

        self.weights = WeightGroup.connect("127.0.0.1", port, world_size, timeout_s=60)

    def broadcast(self) -> list[float]:
        """Join over gloo, then rank 0's CUDA tensor [256] (bf16: integers 0..255 exact) to everyone."""
        self.weights.join("gloo")
        values = torch.arange(256, dtype=torch.bfloat16, device="cuda") * (self.weights.rank == 0)
        self.weights.group.broadcast(values, 0).wait()
        return values.float().cpu().tolist()

    def release(self) -> tuple[int, int]:
        """Reserved bytes with 1 GiB freed but cached, then after `release_device_memory`."""
        from alignment.synced_worker import release_device_memory

        block = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
        del block
        return torch.cuda.memory_reserved(), release_device_memory("cuda")


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_colocated_pair_shares_one_gpu_moves_cuda_weights_over_gloo_and_frees_its_cache(ray_session):
    learner = _pool("learner_pool", num_cpus_per_worker=0.5, num_gpus_per_worker=0.5, ready_timeout_s=120)
    rollout = _pool("rollout.pool", num_cpus_per_worker=0.5, num_gpus_per_worker=0.5, ready_timeout_s=120)
    shared = reserve_shared([learner, rollout])  # one bundle {CPU: 1, GPU: 1}
    try:
        workers = make_pool(CudaPeer, (), rollout, bundles=shared)
        ranks = RankGroup(CudaPeer, (), learner, bundles=shared)
        (rank,), (worker,) = ranks.placements(), workers.placements()
        assert len(rank.gpu_ids) == 1 and rank.gpu_ids == worker.gpu_ids and unpaired([rank], [worker]) == []
        (port,) = ranks.call_all("host", 2)
        workers.call_all("connect", port, 2)
        pending = ranks.submit("broadcast")  # NCCL would refuse two ranks on one GPU; gloo takes CUDA tensors
        (received,) = workers.call_all("broadcast")
        assert ranks.collect(pending)[0] == received == [float(i) for i in range(256)]
        (cached, after), (cached_w, after_w) = ranks.call_all("release")[0], workers.call_all("release")[0]
        assert min(cached, cached_w) >= 2**30 and max(after, after_w) < 2**26  # 1 GiB cached -> < 64 MiB
        ranks.shutdown()
        workers.shutdown()
    finally:
        shared.release()
