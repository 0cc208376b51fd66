"""The process group of a job's ranks, and which share of the data each rank takes.

Network: a lone process (no launcher) opens no port reachable from outside. `init_distributed` sets up
its world-size-1 group through an in-memory `HashStore` (env:// would start a TCPStore on MASTER_PORT,
listening on every interface) and puts the backend's own sockets (gloo's listener, NCCL's bootstrap) on
the loopback interface. Under a launcher (torchrun, deepspeed) DeepSpeed initialises env:// as the
launcher set it up: that rendezvous listens on the network by design (torch's and the cluster's concern).

Data parallelism: a job's step consumes a fixed global batch (a slice of its seeded sample stream, the
same whatever the world size); rank r of N takes the r-th contiguous 1/N of it (`rank_share`), so the N
ranks together train exactly the batch one process would, and DeepSpeed averages their gradients.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from core.errors import ConfigError


def world_size() -> int:
    """Ranks of this job as the launcher (torchrun, deepspeed) announces them; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank as the launcher announces it; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def rank_share(count: int, rank: int, world_size: int) -> range:
    """Positions of this rank's contiguous share of `count` items (count divisible by world_size):
    rank_share(8, 1, 2) = range(4, 8)."""
    per = count // world_size
    return range(rank * per, (rank + 1) * per)


def check_divisible(where: str, count: int, per_micro: int, world: int, unit: str) -> None:
    """`count` items per step must split into `world` ranks x whole micro batches of `per_micro`."""
    if count % (per_micro * world):
        raise ConfigError(f"{where}: {count} {unit} per step is not a multiple of micro batch x ranks "
                          f"({per_micro} x {world})")  # fmt: skip


def launched() -> bool:
    """Whether a launcher (torchrun, the deepspeed launcher) started this process: it sets MASTER_ADDR and
    MASTER_PORT, the rendezvous env:// reads. A lone process sets neither (ensure_single_process_env)."""
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def ensure_single_process_env() -> None:
    """A lone process (no launcher): the rank variables jobs and DeepSpeed read. No MASTER_ADDR/MASTER_PORT:
    its process group meets in memory (init_distributed), not over TCP."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def init_distributed() -> None:
    """torch.distributed, before deepspeed.initialize: DeepSpeed's comm layer then reuses this group
    (deepspeed.comm.init_distributed: `cdb is None and torch.distributed.is_initialized()` wraps it as is).

    A lone process gets a world-size-1 group on DeepSpeed's backend for this machine (gloo on CPUs, nccl on
    CUDA) whose store is an in-memory HashStore: no TCPStore, so no port on any interface. The backends'
    own sockets are pinned to the loopback interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME; set for the
    process's lifetime, since every later group reads them: a lone process has no peer to reach). Under a
    launcher nothing happens here: DeepSpeed initialises env:// as the launcher set it up."""
    if dist.is_initialized() or launched():
        return
    ensure_single_process_env()
    if (os.environ["WORLD_SIZE"], os.environ["RANK"]) != ("1", "0"):
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} RANK={os.environ['RANK']} without MASTER_ADDR/MASTER_PORT: "
            "start multi-process jobs with torchrun or the deepspeed launcher"
        )
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import default_pg_timeout

    loopback = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    os.environ["NCCL_SOCKET_IFNAME"] = loopback
    backend = get_accelerator().communication_backend_name()
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=default_pg_timeout)
