"""Pools: lazy unordered streaming, and Ray workers that die mid-call are replaced without losing calls."""

import os
from pathlib import Path

import pytest

from core.pools import LocalPool, RayPool, WorkerLostError


class Flaky:
    """Squares numbers; the first process to see `die_on` exits (once per marker file)."""

    def __init__(self, marker: str, die_on: int):
        self.marker, self.die_on, self.version = Path(marker), die_on, 0

    def set_version(self, version: int) -> int:
        self.version = version
        return version

    def square(self, x: int) -> tuple[int, int]:
        if x == self.die_on and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)  # a hard crash: no exception, the process is gone
        return x * x, self.version


def test_local_pool_streams_in_input_order_and_reads_inputs_lazily(tmp_path):
    pool = LocalPool(Flaky, (str(tmp_path / "m"), -1), num_workers=2)
    read = []

    def inputs():
        for x in range(4):
            read.append(x)
            yield (x,)

    stream = pool.imap_unordered("square", inputs())
    assert next(stream) == (0, (0, 0)) and read == [0]  # nothing read ahead in-process
    assert list(stream) == [(1, (1, 0)), (2, (4, 0)), (3, (9, 0))]


@pytest.mark.ray
def test_ray_pool_replaces_a_dead_worker_reruns_its_calls_and_replays_sticky_state(tmp_path, ray_session):
    pool = RayPool(Flaky, (str(tmp_path / "m"), 5), num_workers=2, num_cpus=0.5, max_restarts=1)
    pool.call_all("set_version", 7, sticky=True)
    results = dict(pool.imap_unordered("square", [(x,) for x in range(12)]))
    assert results == {x: (x * x, 7) for x in range(12)}  # every call once, the replacement holds version 7
    assert pool.num_restarts == 1 and (tmp_path / "m").is_file()
    pool.shutdown()


@pytest.mark.ray
def test_ray_pool_gives_up_when_restarts_run_out(tmp_path, ray_session):
    pool = RayPool(Flaky, (str(tmp_path / "m"), 2), num_workers=1, num_cpus=0.5, max_restarts=0)
    with pytest.raises(WorkerLostError, match="no restarts left"):
        pool.map("square", [(x,) for x in range(4)])
    pool.shutdown()
