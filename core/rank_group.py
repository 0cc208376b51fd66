"""RankGroup: N Ray actors that form one torch.distributed group, one actor per rank, in one placement group.

The shape OpenRLHF and verl give their learners: the driver reserves N bundles together (a cluster that
cannot hold them is one ConfigError line, core/placement.py), starts one actor per bundle, asks rank 0's
actor for its node address and a free port, then constructs the wrapped class on every rank at once with
the variables a launcher would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so whatever
it builds (a DeepSpeed engine) rendezvous through env:// as under torchrun. Ray gives each actor only its
own GPU(s) (CUDA_VISIBLE_DEVICES), so LOCAL_RANK is 0 in every actor. A local Ray (127.0.0.1) keeps
gloo's and NCCL's sockets on the loopback interface.

Colocated (`bundles`, core.pools.reserve_shared): the ranks go into bundles of a group reserved by the
caller, which other actors (the rollout workers) share; the caller releases it, not `shutdown`.
`placements()` reports where Ray put each rank.

`call_all(method, *args)` runs the method on every rank concurrently and returns the results in rank
order (rank 0 first: the one a job logs). `submit` / `collect` split that in two for a call that must
run while the driver also drives someone else (a collective with the rollout workers). Generic: it
knows nothing of what the ranks compute. Ray stays in core/ (pools.py, placement.py, this file).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from core.errors import ConfigError, UserError
from core.placement import (
    ActorPlacement,
    SharedBundles,
    here,
    in_bundle,
    nonzero,
    release_placement,
    reserve_placement,
    wait_started,
)
from core.pools import PoolConfig, ensure_ray

LOOPBACK = "127.0.0.1"


def rank_env(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The launcher variables of one rank (each actor sees its own GPUs only: LOCAL_RANK 0)."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}  # fmt: skip
    if master_addr == LOOPBACK:  # one machine: the backends' sockets on the loopback interface
        names = [name for _, name in socket.if_nameindex()]
        lo = next((n for n in ("lo", "lo0") if n in names), "lo")
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


class RankActor:
    """What runs in each Ray actor: report where it is, set its rank's environment, build the object,
    then forward calls to it."""

    def __init__(self) -> None:
        self.obj: Any = None

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        """A port free on this node now (the rendezvous binds it moments later, as torchrun's does)."""
        with socket.socket() as s:
            s.bind((host if host == LOOPBACK else "", 0))
            return s.getsockname()[1]

    def start(self, env: dict[str, str], cls: type, args: tuple, kwargs: dict) -> None:
        os.environ.update(env)
        self.obj = cls(*args, **kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def placement(self) -> ActorPlacement:
        return here()


class RankGroup:
    """`config.num_workers` ranks of `cls(*args, **kwargs)` as Ray actors with `config`'s CPU/GPU each,
    in one placement group (`config.placement_strategy`, ready within `config.ready_timeout_s`), or rank i
    in bundle `bundles.indices[i]` of a group the caller reserved (and releases)."""

    def __init__(
        self,
        cls: type,
        args: tuple,
        config: PoolConfig,
        where: str = "learner_pool",
        bundles: SharedBundles | None = None,
    ):
        import ray

        ensure_ray(config.address, config.ray_num_cpus)
        self.where = where
        self.actors: list = []
        bundle = nonzero({"CPU": config.num_cpus_per_worker, "GPU": config.num_gpus_per_worker})
        n = config.num_workers
        self.owns_group = bundles is None
        indices = list(bundles.indices) if bundles is not None else list(range(n))
        if len(indices) != n:
            raise ConfigError(f"{where}: {n} ranks but {len(indices)} shared bundles")
        try:
            self.group = bundles.group if bundles is not None else (
                reserve_placement([bundle] * n, config.placement_strategy, config.ready_timeout_s,
                                  what="learner ranks") if bundle else None)  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        remote = ray.remote(num_cpus=config.num_cpus_per_worker, num_gpus=config.num_gpus_per_worker,
                            max_restarts=0)(RankActor)  # fmt: skip
        try:
            for index in indices:
                options = {"scheduling_strategy": in_bundle(self.group, index)} if self.group is not None else {}
                self.actors.append(remote.options(**options).remote())
            wait_started(self.actors, where, config.ready_timeout_s)
            self.master_addr = ray.get(self.actors[0].node_address.remote())
            port = ray.get(self.actors[0].free_port.remote(self.master_addr))
            self.collect([a.start.remote(rank_env(r, n, self.master_addr, port), cls, args, {})
                          for r, a in enumerate(self.actors)])  # fmt: skip
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_ranks(self) -> int:
        return len(self.actors)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Start `method` on every rank; `collect` the results."""
        return [a.call.remote(method, args, kwargs) for a in self.actors]

    def collect(self, pending: list) -> list[Any]:
        """The results of `submit`, rank order. A rank's UserError is raised again as itself (one line);
        a rank that died ends the group's work with a RuntimeError naming it."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(pending)
        except RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise
        except RayActorError as e:
            raise RuntimeError(f"{self.where}: a rank died ({type(e).__name__}); the group cannot continue") from e

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`method(*args, **kwargs)` on every rank at once; results in rank order."""
        return self.collect(self.submit(method, *args, **kwargs))

    def placements(self) -> list[ActorPlacement]:
        """Where Ray runs each rank (placement group, bundle, node, GPU ids), in rank order."""
        import ray

        return ray.get([actor.placement.remote() for actor in self.actors])

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if getattr(self, "owns_group", False):
                release_placement(self.group)
        self.actors = []
