"""Launching a test's worker on N CPU ranks (gloo) with torchrun, as a user launches `nsalign` on GPUs.

A multi-rank test module holds its workers as functions and ends with `if __name__ == "__main__":
WORKERS[sys.argv[1]](*sys.argv[2:])`; the test calls `torchrun(module, worker, nproc, *args)`, which runs
`python -m torch.distributed.run --nproc_per_node N -m <module> <worker> <args>` from the repository root
and returns the finished process (stdout and stderr captured). Each rank reads RANK / WORLD_SIZE.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, worker: str, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `worker` of test module `module` on `nproc` ranks; asserts they all exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks share a few cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", module, worker, *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{worker} on {nproc} ranks failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


class DiesAfter:
    """A process group (a WeightGroup's `group`) that ends its process, a hard crash, at the broadcast after
    the first `n`: a member lost in the middle of a sync."""

    def __init__(self, group, n: int):
        self.group, self.n = group, n

    def broadcast(self, tensor, root: int):
        if self.n == 0:
            os._exit(1)
        self.n -= 1
        return self.group.broadcast(tensor, root)
