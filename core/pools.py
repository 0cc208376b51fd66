"""Worker pools: N copies of a plain worker class, in-process (LocalPool) or as Ray actors (RayPool).

Both pools have the same small interface, so a job never knows which one it drives:
  map(method, [args, ...]) -> [result, ...]   one call per argument tuple, results in order,
                                              spread round-robin over the workers;
  imap_unordered(method, iterable of args)    a stream of (input index, result) as calls finish,
                                              each worker kept busy, inputs read lazily;
  call_all(method, *args, sticky=False)       the same call on every worker (e.g. new weights);
                                              sticky calls are replayed on replacement workers;
  call_all_or_replace(method, *args)          the same call on every worker, once; a worker that
                                              dies in it is replaced and its result is None;
  call_each_or_replace(method, [args, ...])   the same, with worker i's own args;
  num_restarts                                workers replaced so far;
  shutdown()                                  release the workers.
Fault tolerance (RayPool): a worker whose process dies is replaced by a fresh one (its constructor
runs again, then the sticky calls), at most `max_restarts` times per pool, and the calls it held are
re-run elsewhere, at most `max_task_retries` times each. Only idempotent methods belong in a pool
(rollouts are: a sample depends only on its prompt id, index, seed and weights).
Ray stays in core/: this file, placement.py, rank_group.py, ray_session.py and ray_reaper.py. RayPool
starts a local Ray on 127.0.0.1 unless an `address` is given, and never shuts it down, because other
pools may share it (core/ray_session.py `ensure_ray`: a local Ray never outlives its driver).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from core.errors import ConfigError
from core.placement import (
    STRATEGIES,
    ActorPlacement,
    SharedBundles,
    here,
    in_bundle,
    nonzero,
    release_placement,
    reserve_placement,
    wait_started,
)
from core.ray_session import ensure_ray


@dataclass
class PoolConfig:
    """How many workers and where: in-process, or Ray actors with these resources each."""

    kind: Literal["local", "ray"] = "local"
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_restarts: int = 3  # dead workers replaced over the pool's life (constructor + sticky calls run again)
    max_task_retries: int = 2  # re-runs of one call whose worker died (pool methods are idempotent)
    address: str | None = None  # None: start a local Ray; 'auto' / 'host:port': join a running cluster
    ray_num_cpus: int | None = None  # CPUs of a locally started Ray (None: all of them)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # Ray placement group
    ready_timeout_s: float = 600.0  # wait for the placement, then again for the workers' constructors
    label: ClassVar[str] = "pool"  # where the config sits ('rollout.pool'), set by validate, named in errors

    def validate(self, where: str) -> None:
        self.label = where
        if self.num_workers < 1:
            raise ConfigError(f"{where}.num_workers: must be >= 1, got {self.num_workers}")
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise ConfigError(f"{where}: per-worker CPU/GPU counts must be >= 0")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError(f"{where}: max_restarts and max_task_retries must be >= 0")
        if self.placement_strategy not in STRATEGIES:
            raise ConfigError(f"{where}.placement_strategy: {self.placement_strategy!r} is not one of {STRATEGIES}")
        if not self.ready_timeout_s > 0:
            raise ConfigError(f"{where}.ready_timeout_s: must be > 0, got {self.ready_timeout_s}")


class LocalPool:
    """`num_workers` instances of `worker_cls` in this process; calls run one after another."""

    num_restarts = 0  # workers replaced so far (RayPool's count; in-process workers never die)

    def __init__(self, worker_cls: type, args: tuple = (), kwargs: dict | None = None, num_workers: int = 1):
        self.workers = [worker_cls(*args, **(kwargs or {})) for _ in range(num_workers)]

    def map(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """`worker.method(*args)` for each args tuple, worker i % N; results in input order."""
        return [result for _, result in self.imap_unordered(method, arg_tuples)]

    def imap_unordered(
        self, method: str, arg_tuples: Iterable[tuple], max_in_flight: int = 1
    ) -> Iterator[tuple[int, Any]]:
        """(input index, result) per call; in-process they finish in input order."""
        n = len(self.workers)
        for i, args in enumerate(arg_tuples):
            yield i, getattr(self.workers[i % n], method)(*args)

    def call_all(self, method: str, *args: Any, sticky: bool = False, **kwargs: Any) -> list[Any]:
        """The same call on every worker; one result per worker (in-process workers never die)."""
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def call_all_or_replace(self, method: str, *args: Any) -> list[Any]:
        """`call_all`: nobody dies in-process, so nobody is replaced."""
        return self.call_all(method, *args)

    def call_each_or_replace(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """`method(*arg_tuples[i])` on worker i."""
        return [getattr(w, method)(*args) for w, args in zip(self.workers, arg_tuples, strict=True)]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def shutdown(self) -> None:
        self.workers = []


class WorkerLostError(RuntimeError):
    """A pool ran out of restarts or retries after its workers died."""


class RayPool:
    """`num_workers` Ray actors of the same plain `worker_cls`, each with its CPU/GPU resources.

    The workers' resources are reserved together in a placement group (one bundle per worker, actor i
    in bundle i) and the pool waits until every constructor has run: a cluster too small, resources
    held elsewhere past `ready_timeout_s`, or a constructor that raises end in one error line instead of
    a hang. Dead actors are replaced by the pool itself (Ray's own actor restart is off), in the same
    bundle, so the pool knows which calls were lost and re-runs them; see the module docstring. Given
    `bundles` (another pool's actors time-share them, `reserve_shared`) it reserves nothing: actor i goes
    to bundle `bundles.indices[i]`, and the group stays when the pool shuts down.
    """

    def __init__(
        self,
        worker_cls: type,
        args: tuple = (),
        kwargs: dict | None = None,
        num_workers: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_restarts: int = 3,
        max_task_retries: int = 2,
        address: str | None = None,
        ray_num_cpus: int | None = None,
        placement_strategy: str = "PACK",
        ready_timeout_s: float = 600.0,
        where: str = "pool",
        bundles: SharedBundles | None = None,
    ):
        import ray

        ensure_ray(address, ray_num_cpus)
        self._remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(worker_cls)
        self._args, self._kwargs = args, kwargs or {}
        self.restarts_left, self.max_task_retries = max_restarts, max_task_retries
        self.num_restarts = 0
        self._sticky: dict[str, tuple[tuple, dict]] = {}  # method -> last broadcast args, replayed on new actors
        self.actors: list = []
        bundle = nonzero({"CPU": num_cpus, "GPU": num_gpus})  # a worker asking for nothing needs no reservation
        self.owns_group = bundles is None
        self.bundle_indices = list(bundles.indices) if bundles is not None else list(range(num_workers))
        if len(self.bundle_indices) != num_workers:
            raise ConfigError(f"{where}: {num_workers} workers but {len(self.bundle_indices)} shared bundles")
        try:
            self.group = bundles.group if bundles is not None else (
                reserve_placement([bundle] * num_workers, placement_strategy, ready_timeout_s) if bundle else None
            )  # fmt: skip
        except ConfigError as e:  # '3 workers x 1 GPU = 3 GPU requested, ...', named after the pool's config key
            raise ConfigError(f"{where}: {e}") from None
        try:
            self.actors = [self._start(slot) for slot in range(num_workers)]
            hint = f" (constructors still running? raise {where}.ready_timeout_s)"
            wait_started(self.actors, where, ready_timeout_s, hint)
        except BaseException:
            self.shutdown()
            raise
        self.generation = [0] * num_workers  # bumped when slot i gets a fresh actor

    def _start(self, slot: int) -> Any:
        """A new actor for `slot`, in that slot's bundle of the pool's placement group."""
        group, index = self.group, self.bundle_indices[slot]
        options = {"scheduling_strategy": in_bundle(group, index)} if group is not None else {}
        return self._remote_cls.options(**options).remote(*self._args, **self._kwargs)

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    def _replace(self, slot: int, generation: int, error: Exception) -> None:
        """Give `slot` a fresh actor, unless a failure seen earlier already did."""
        import ray

        if self.generation[slot] != generation:
            return
        if self.restarts_left <= 0:
            raise WorkerLostError(f"worker {slot} died and the pool has no restarts left ({error})") from error
        self.restarts_left -= 1
        self.num_restarts += 1
        ray.kill(self.actors[slot], no_restart=True)  # frees its bundle for the replacement
        actor = self._start(slot)
        for method, (args, kwargs) in self._sticky.items():
            getattr(actor, method).remote(*args, **kwargs)  # ordered before any later call on this actor
        self.actors[slot] = actor
        self.generation[slot] += 1
        print(f"pool: worker {slot} died ({type(error).__name__}); replaced it, {self.restarts_left} restarts left")

    def imap_unordered(
        self, method: str, arg_tuples: Iterable[tuple], max_in_flight: int = 2
    ) -> Iterator[tuple[int, Any]]:
        """(input index, result) as calls finish; at most `max_in_flight` queued calls per actor, so a
        worker always has its next call ready while inputs are read lazily. Calls of a dead worker
        are re-run on the others (and on its replacement)."""
        import ray
        from ray.exceptions import RayActorError

        inputs = enumerate(arg_tuples)
        retry: list[tuple[int, tuple, int]] = []  # (index, args, tries so far)
        pending: dict[Any, tuple[int, tuple, int, int, int]] = {}  # ref -> (index, args, tries, slot, gen)
        load = [0] * len(self.actors)
        exhausted = False
        while True:
            while not (exhausted and not retry) and min(load) < max_in_flight:
                if retry:
                    index, args, tries = retry.pop(0)
                else:
                    item = next(inputs, None)
                    if item is None:
                        exhausted = True
                        continue
                    (index, args), tries = item, 0
                slot = load.index(min(load))
                ref = getattr(self.actors[slot], method).remote(*args)
                pending[ref] = (index, args, tries, slot, self.generation[slot])
                load[slot] += 1
            if not pending:
                return
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            index, args, tries, slot, gen = pending.pop(ref)
            if gen == self.generation[slot]:
                load[slot] -= 1
            try:
                result = ray.get(ref)
            except RayActorError as e:
                if tries >= self.max_task_retries:
                    raise WorkerLostError(f"call {method}#{index} lost its worker {tries + 1} times ({e})") from e
                if gen == self.generation[slot]:
                    load[slot] = 0  # the old actor's other calls are lost too; they come back as errors
                self._replace(slot, gen, e)
                retry.append((index, args, tries + 1))
                continue
            yield index, result

    def map(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """Calls spread over the actors, run concurrently; results in input order."""
        results: dict[int, Any] = dict(self.imap_unordered(method, arg_tuples, max_in_flight=len(arg_tuples) or 1))
        return [results[i] for i in range(len(arg_tuples))]

    def call_all(self, method: str, *args: Any, sticky: bool = False, **kwargs: Any) -> list[Any]:
        """The same call on every actor. `sticky`: also replay it on any actor that replaces a dead one
        (e.g. the newest weights), so a replacement serves the same policy version."""
        import ray

        if sticky:
            self._sticky[method] = (args, kwargs)
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def call_all_or_replace(self, method: str, *args: Any) -> list[Any]:
        """The same call on every actor, once: a worker that dies in it is replaced (as in `imap_unordered`;
        WorkerLostError past the restart budget) and its result is None. The call is not re-run on the
        replacement: it may be one side of a collective (a weight broadcast) the others have left."""
        return self.call_each_or_replace(method, [args] * len(self.actors))

    def call_each_or_replace(self, method: str, arg_tuples: list[tuple]) -> list[Any]:
        """`method(*arg_tuples[i])` on worker i (one per worker: what only worker i can use, e.g. a handle to
        memory on its GPU), once, as `call_all_or_replace`."""
        import ray
        from ray.exceptions import RayActorError

        calls = [(slot, self.generation[slot], getattr(a, method).remote(*args))
                 for slot, (a, args) in enumerate(zip(self.actors, arg_tuples, strict=True))]  # fmt: skip
        results = []
        for slot, generation, ref in calls:
            try:
                results.append(ray.get(ref))
            except RayActorError as e:
                self._replace(slot, generation, e)
                results.append(None)
        return results

    def placements(self) -> list[ActorPlacement]:
        """Where Ray runs each worker (placement group, bundle, node, GPU ids), in worker order."""
        import ray

        return ray.get([actor.__ray_call__.remote(_placement_of) for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the actors and remove the placement group (their reserved resources go back), unless the
        group is shared: its owner releases it."""
        import ray

        if ray.is_initialized():  # not after a signal already took Ray down (ensure_ray)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self.owns_group:
                release_placement(self.group)
        self.actors, self.group = [], None


def _placement_of(worker: Any) -> ActorPlacement:
    """Run in an actor by `__ray_call__` (any worker class): where it is."""
    return here()


def make_pool(
    worker_cls: type, args: tuple, config: PoolConfig, kwargs: dict | None = None, bundles: SharedBundles | None = None
) -> LocalPool | RayPool:
    """The pool `config.kind` names, holding `config.num_workers` copies of `worker_cls(*args, **kwargs)`;
    with `bundles` (Ray only) its actors go into those bundles of a group reserved by the caller."""
    if config.kind == "local":
        if bundles is not None:
            raise ConfigError(f"{config.label}.kind: 'local' workers cannot share a placement group; use 'ray'")
        return LocalPool(worker_cls, args, kwargs, config.num_workers)
    return RayPool(
        worker_cls, args, kwargs, config.num_workers, config.num_cpus_per_worker, config.num_gpus_per_worker,
        config.max_restarts, config.max_task_retries, config.address, config.ray_num_cpus,
        config.placement_strategy, config.ready_timeout_s, config.label, bundles,
    )  # fmt: skip


def shared_bundle(configs: Sequence[PoolConfig]) -> dict[str, float]:
    """One bundle holding one actor of every pool: the sum of their per-actor CPU and GPU."""
    return {"CPU": sum(c.num_cpus_per_worker for c in configs), "GPU": sum(c.num_gpus_per_worker for c in configs)}


def reserve_shared(configs: Sequence[PoolConfig], what: str = "colocated bundles") -> SharedBundles:
    """One placement group for pools of equal size whose actor i share bundle i (`shared_bundle`), reserved
    like any pool's (the first pool's Ray address and strategy, the longest ready timeout): a cluster that
    cannot hold it is one ConfigError line naming every pool. The caller passes it to each pool and
    releases it (`SharedBundles.release`) after shutting them down."""
    where = " + ".join(c.label for c in configs)
    counts = {c.num_workers for c in configs}
    if len(counts) != 1:
        raise ConfigError(f"{where}: colocated pools need equal num_workers, got {[c.num_workers for c in configs]}")
    first, n = configs[0], counts.pop()
    ensure_ray(first.address, first.ray_num_cpus)
    bundle = nonzero(shared_bundle(configs))
    try:
        group = reserve_placement([bundle] * n, first.placement_strategy, max(c.ready_timeout_s for c in configs),
                                  what=what)  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return SharedBundles(group, tuple(range(n)))
