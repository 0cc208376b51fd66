"""Worker pools: N copies of a plain worker class, in-process (LocalPool) or as Ray actors (RayPool).

Both pools have the same small interface, so a job never knows which one it drives:
  map(method, [args, ...]) -> [result, ...]   one call per argument tuple, results in order,
                                              spread round-robin over the workers;
  call_all(method, *args) -> [result per worker]   e.g. broadcast new weights;
  shutdown()                                       release the workers.
Ray lives in this file and nowhere else. RayPool starts a local Ray on 127.0.0.1 unless an `address`
is given ('auto' joins a cluster started with `ray start`); it never shuts Ray down, because other
pools may share it: a driver that wants Ray gone calls `ray.shutdown()` at its end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from base_model.errors import ConfigError


@dataclass
class PoolConfig:
    """How many workers and where: in-process, or Ray actors with these resources each."""

    kind: Literal["local", "ray"] = "local"
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_restarts: int = 0  # Ray restarts of a crashed actor (its constructor runs again)
    max_task_retries: int = 0  # retries of a call on a restarted actor; only for idempotent methods
    address: str | None = None  # None: start a local Ray; 'auto' / 'host:port': join a running cluster
    ray_num_cpus: int | None = None  # CPUs of a locally started Ray (None: all of them)

    def validate(self, where: str) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{where}.num_workers: must be >= 1, got {self.num_workers}")
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise ConfigError(f"{where}: per-worker CPU/GPU counts must be >= 0")


class LocalPool:
    """`num_workers` instances of `worker_cls` in this process; calls run one after another."""

    def __init__(self, worker_cls: type, args: tuple = (), kwargs: dict | None = None, num_workers: int = 1):
        self.workers = [worker_cls(*args, **(kwargs or {})) for _ in range(num_workers)]

    def map(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """`worker.method(*args)` for each args tuple, worker i % N; results in input order."""
        n = len(self.workers)
        return [getattr(self.workers[i % n], method)(*args) for i, args in enumerate(arg_tuples)]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The same call on every worker; one result per worker."""
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def shutdown(self) -> None:
        self.workers = []


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process: local on 127.0.0.1 without dashboard, or `address`."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    else:
        ray.init(address=address)


class RayPool:
    """`num_workers` Ray actors of the same plain `worker_cls`, each with its CPU/GPU resources."""

    def __init__(
        self,
        worker_cls: type,
        args: tuple = (),
        kwargs: dict | None = None,
        num_workers: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_restarts: int = 0,
        max_task_retries: int = 0,
        address: str | None = None,
        ray_num_cpus: int | None = None,
    ):
        import ray

        ensure_ray(address, ray_num_cpus)
        remote_cls = ray.remote(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=max_task_retries
        )(worker_cls)
        self.actors = [remote_cls.remote(*args, **(kwargs or {})) for _ in range(num_workers)]

    def map(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """Calls spread round-robin over the actors, run concurrently; results in input order."""
        import ray

        n = len(self.actors)
        refs = [getattr(self.actors[i % n], method).remote(*args) for i, args in enumerate(arg_tuples)]
        return ray.get(refs)

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def make_pool(worker_cls: type, args: tuple, config: PoolConfig, kwargs: dict | None = None) -> LocalPool | RayPool:
    """The pool `config.kind` names, holding `config.num_workers` copies of `worker_cls(*args, **kwargs)`."""
    if config.kind == "local":
        return LocalPool(worker_cls, args, kwargs, config.num_workers)
    return RayPool(
        worker_cls, args, kwargs, config.num_workers, config.num_cpus_per_worker, config.num_gpus_per_worker,
        config.max_restarts, config.max_task_retries, config.address, config.ray_num_cpus,
    )  # fmt: skip
