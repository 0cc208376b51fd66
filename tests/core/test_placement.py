"""Placement groups for Ray pools: a request the cluster cannot meet ends in one line (at once when it can
never fit, after the timeout when the resources are held elsewhere), constructor errors surface as one
line, and replacement workers stay in the pool's placement group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.errors import CheckpointError, ConfigError
from core.placement import StartError, describe, never_fits, release_placement, reserve_placement, start_error
from core.pools import PoolConfig, RayPool, make_pool
from core.schema import from_dict
from tests.hardening.helpers import BadInput, run_bad_input

ROOT = Path(__file__).resolve().parents[2]
NODE = {"CPU": 64.0, "GPU": 4.0}  # one node of a hand-made cluster


# -- without Ray: what can never fit, and how it reads -----------------------------------------------------


def test_never_fits_names_the_short_resource_gpu_first():
    two_nodes = [NODE, NODE]  # 128 CPU, 8 GPU
    assert never_fits([{"CPU": 1, "GPU": 1}] * 10, "PACK", two_nodes) == "GPU"  # 10 > 8 GPU
    assert never_fits([{"CPU": 40, "GPU": 1}] * 4, "PACK", two_nodes) == "CPU"  # 160 > 128 CPU
    assert never_fits([{"CPU": 40, "GPU": 3}] * 4, "PACK", two_nodes) == "GPU"  # both short: GPU named
    assert never_fits([{"CPU": 8, "GPU": 1}] * 8, "PACK", two_nodes) is None  # exactly full


def test_never_fits_checks_single_nodes_and_the_strict_strategies():
    two_nodes = [NODE, NODE]
    assert never_fits([{"GPU": 5}], "PACK", two_nodes) == "bundle"  # 5 GPU in total, 4 per node
    assert never_fits([{"GPU": 2}] * 3, "STRICT_PACK", two_nodes) == "one node"  # 6 GPU on one 4-GPU node
    assert never_fits([{"GPU": 2}] * 3, "PACK", two_nodes) is None
    assert never_fits([{"CPU": 1}] * 3, "STRICT_SPREAD", two_nodes) == "nodes"  # 3 bundles, 2 nodes
    assert never_fits([{"CPU": 1}] * 2, "STRICT_SPREAD", two_nodes) is None
    assert never_fits([{"GPU": 1}], "PACK", [{"CPU": 2.0}]) == "GPU"  # a GPU-less cluster


def test_describe_reads_as_the_request_and_what_the_cluster_has():
    cluster = {"CPU": 128.0, "GPU": 8.0}
    line = describe([{"CPU": 1.0, "GPU": 1.0}] * 10, "workers", cluster, "GPU")
    assert line == "10 workers x 1 GPU = 10 GPU requested, the Ray cluster has 8 GPU"
    line = describe([{"CPU": 0.5}] * 3, "learner ranks", {"CPU": 1.0}, None)
    assert line == "3 learner ranks x 0.5 CPU = 1.5 CPU requested, the Ray cluster has 1 CPU"
    line = describe([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}], "ranks", cluster, None)  # unequal
    assert line == "2 ranks = 2 GPU + 10 CPU requested, the Ray cluster has 8 GPU + 128 CPU"


def test_a_constructor_error_becomes_one_line():
    """Ray's text of a failed creation task (colour codes, traceback) -> the user's own error, or the last line."""
    text = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::W.__init__()\x1b[39m "
        '(pid=1, ip=1.2.3.4)\n  File "w.py", line 3, in __init__\n    raise E(...)\n'
    )
    user = start_error(RuntimeError(text + "core.errors.CheckpointError: m.safetensors: truncated shard"), "pool", 1)
    assert type(user) is CheckpointError and str(user) == "m.safetensors: truncated shard"
    bug = start_error(RuntimeError(text + "ValueError: boom"), "rollout.pool", 2)
    assert type(bug) is StartError and str(bug) == "rollout.pool: worker 2 failed to start: ValueError: boom"


def test_pool_config_checks_the_placement_keys():
    assert from_dict(PoolConfig, {"placement_strategy": "SPREAD"}, "rollout.pool").placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="rollout.pool.placement_strategy"):
        from_dict(PoolConfig, {"placement_strategy": "spread"}, "rollout.pool")
    with pytest.raises(ConfigError, match=r"^rewards.pool.ready_timeout_s: must be > 0, got 0.0$"):
        from_dict(PoolConfig, {"ready_timeout_s": 0}, "rewards.pool")
    with pytest.raises(ConfigError, match="is not one of"):
        PoolConfig(placement_strategy="NEAR").validate("pool")  # type: ignore[arg-type]


# -- on a local Ray of 2 CPUs ------------------------------------------------------------------------------


class Probe:
    """Reports the placement group it runs in; the first process to see x == 1 exits (once per marker)."""

    def __init__(self, marker: str, fail: str = ""):
        if fail == "user":
            raise CheckpointError("model.safetensors: truncated safetensors shard")
        if fail == "bug":
            raise ValueError("boom")
        self.marker = Path(marker)

    def group(self, x: int) -> str:
        import ray

        if x == 1 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return ray.get_runtime_context().get_placement_group_id()


@pytest.mark.ray
def test_a_pool_larger_than_the_cluster_fails_at_once_in_one_line(tmp_path, ray_session):
    import ray

    start = time.monotonic()
    with pytest.raises(ConfigError) as cpu:
        RayPool(Probe, (str(tmp_path / "m"),), num_workers=3, num_cpus=1, ready_timeout_s=30)
    assert str(cpu.value) == "pool: 3 workers x 1 CPU = 3 CPU requested, the Ray cluster has 2 CPU (it can never fit)"
    gpus = ray.cluster_resources().get("GPU", 0.0)  # 0 here; the GPU machine has some
    config = from_dict(PoolConfig, {"kind": "ray", "num_workers": 2, "num_cpus_per_worker": 0.5,
                                    "num_gpus_per_worker": 1000, "ready_timeout_s": 30}, "rollout.pool")  # fmt: skip
    with pytest.raises(ConfigError) as gpu:
        make_pool(Probe, (str(tmp_path / "m"),), config)
    assert str(gpu.value) == (
        f"rollout.pool: 2 workers x 1000 GPU = 2000 GPU requested, the Ray cluster has {gpus:g} GPU (it can never fit)"
    )
    assert time.monotonic() - start < 5  # no waiting: the cluster total answers


@pytest.mark.ray
def test_resources_held_elsewhere_time_out_in_one_line(tmp_path, ray_session):
    import ray

    holder = reserve_placement([{"CPU": 2}], timeout_s=30, what="holders")  # every CPU of the cluster
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError) as busy:
            RayPool(Probe, (str(tmp_path / "m"),), num_workers=1, num_cpus=0.5, ready_timeout_s=1.5)
        waited = time.monotonic() - start
    finally:
        release_placement(holder)
    assert str(busy.value) == (
        "pool: 1 workers x 0.5 CPU = 0.5 CPU requested, the Ray cluster has 2 CPU "
        "(0 CPU free; timed out after 1.5 s waiting for a placement group)"
    )
    assert 1.5 <= waited < 10
    pending = [g for g in ray.util.placement_group_table().values() if g["state"] not in ("CREATED", "REMOVED")]
    assert pending == []  # the group that timed out was removed, not left waiting


@pytest.mark.ray
def test_constructor_errors_surface_and_replacements_stay_in_the_group(tmp_path, ray_session):
    import ray

    with pytest.raises(CheckpointError, match=r"^model.safetensors: truncated safetensors shard$"):
        RayPool(Probe, (str(tmp_path / "m"), "user"), num_workers=2, num_cpus=0.5, ready_timeout_s=60)
    with pytest.raises(StartError, match=r"^pool: worker 0 failed to start: ValueError: boom$"):
        RayPool(Probe, (str(tmp_path / "m"), "bug"), num_workers=1, num_cpus=0.5, ready_timeout_s=60)
    pool = RayPool(Probe, (str(tmp_path / "m"),), num_workers=2, num_cpus=1, max_restarts=1, ready_timeout_s=60)
    group = pool.group  # the whole cluster: a worker outside the group could never start
    ids = pool.map("group", [(x,) for x in range(4)])
    assert pool.num_restarts == 1 and ids == [group.id.hex()] * 4
    pool.shutdown()
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"


@pytest.mark.ray
def test_the_cli_exits_2_with_one_line_when_the_pool_cannot_be_placed(tmp_path, capsys, ray_session):
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)
    out = tmp_path / "eval"
    config = ROOT / "configs/evaluate/tiny.yaml"
    pool = "{kind: ray, num_workers: 2, num_cpus_per_worker: 0.5, num_gpus_per_worker: 1000, ready_timeout_s: 30}"
    argv = ["evaluate", str(config), f"out_dir={out}", f"rollout.pool={pool}"]
    message = f"{config}.rollout.pool: 2 workers x 1000 GPU = 2000 GPU requested, the Ray cluster has {gpus:g} GPU"
    run_bad_input(BadInput("evaluate", argv, message, [out / "scores"]), capsys)
