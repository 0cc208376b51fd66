"""Policy weights from learner rank 0 to the rollout workers over torch.distributed, in flat buckets.

Learner rank 0 and every rollout worker form a "weight group" of their own, apart from the learners'
group: rank 0 opens a TCPStore on a port the OS picks (`WeightGroup.host`), each worker joins it and
draws its rank (1..R) from the store. Per sync rank 0 takes the policy as a stream of tensors in the sync
dtype (bf16 at scale; `Learner.iter_policy` gathers one ZeRO-3 parameter at a time on the device), copies
them into one preallocated flat bucket of at most `bucket_bytes` and broadcasts it each time it is full
(`fill_buckets`): rank 0 holds one bucket and one gathered tensor at a time, never the whole policy. Each
worker copies every bucket's slices straight into its model's tensors, in place, in its own dtype.
Buckets travel as bytes (a uint8 view), so gloo (CPUs) and nccl (CUDA) take the same calls. The Ray
object store never holds a weight: what the driver passes around is a host, a port and a version.

The layout (names, shapes, bucket boundaries) is rank 0's to decide: it is published once in the store
as JSON before the first bucket, and every worker checks it against its own model before receiving.

A group is never repaired, only re-formed: a process group's members are fixed when it forms, so a worker
that dies (and the fresh one that replaces it) leaves the group useless. A broadcast that fails raises
`GroupBroken` in every member that sees it, after the member has closed its side (`close` aborts the
connections, so a member waiting on it fails at once instead of at the timeout); rank 0 also runs its
stream to the end first (its ZeRO-3 gathers are collective with the other learner ranks). The driver then
forms a new group: rank 0 hosts a fresh store, every worker, old and new, drops its group and joins.

Colocated (`weight_sync.transport: ipc`, as verl and OpenRLHF hand weights over): learner rank i and rollout
worker i share one GPU, and every learner rank has each full tensor in turn (a ZeRO-3 gather is collective),
so rank i fills the same buckets itself and hands worker i a small handle to each one (`share_bucket`:
torch's CUDA IPC handle, or on a CPU the shared-memory file the bucket lives in); the worker maps it
(`open_bucket`) and copies the slices into its model. The bytes never leave the device and no process
group is involved. The handle travels however the caller likes (through Ray): it is plain data.
Pure torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from core.errors import CheckpointError, ConfigError

SYNC_DTYPES = ("bfloat16", "float16", "float32")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class Slot(NamedTuple):
    """Where one tensor lies in its bucket: `offset` in elements of the bucket's dtype."""

    name: str
    shape: tuple[int, ...]
    offset: int


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_buckets(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, bucket_bytes: int) -> list[list[Slot]]:
    """Tensors in order, packed greedily: the next tensor joins the current bucket unless that would pass
    `bucket_bytes`; a tensor larger than `bucket_bytes` fills a bucket of its own."""
    buckets: list[list[Slot]] = []
    current: list[Slot] = []
    used = 0  # elements in `current`
    for name, shape in shapes:
        size = numel(shape)
        if current and (used + size) * itemsize > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(Slot(name, tuple(shape), used))
        used += size
    if current:
        buckets.append(current)
    return buckets


def bucket_numel(slots: list[Slot]) -> int:
    last = slots[-1]
    return last.offset + numel(last.shape)


def iter_buckets(
    state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[torch.Tensor, list[Slot]]]:
    """(flat bucket [n] of `dtype` on `device`, its slots), one bucket alive at a time."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_buckets([(k, tuple(v.shape)) for k, v in state.items()], itemsize, bucket_bytes)
    for slots in plan:
        flat = torch.empty(bucket_numel(slots), dtype=dtype, device=device)
        for name, shape, offset in slots:
            flat[offset : offset + numel(shape)].copy_(state[name].reshape(-1))  # cast on copy
        yield flat, slots


def fill_buckets(
    plan: list[list[Slot]],
    stream: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    bucket_bytes: int,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """The buckets of `plan`, each a flat [n] of `dtype`, filled from `stream` ((name, tensor) in the plan's
    order) in one buffer allocated up front (the largest bucket within `bucket_bytes`) and reused: a yielded
    bucket is valid until the next is asked for. A tensor over `bucket_bytes` (a bucket of its own) goes as
    itself, flattened (cast if it is not in `dtype` yet), never through the buffer. The stream is advanced only
    to fill the current bucket, so what is alive is the buffer plus the stream's current tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits = [len(b) > 1 or bucket_numel(b) * itemsize <= bucket_bytes for b in plan]
    capacity = max((bucket_numel(b) for b, ok in zip(plan, fits) if ok), default=0)
    buffer = torch.empty(capacity, dtype=dtype, device=device)
    for slots, ok in zip(plan, fits):
        if not ok:
            yield _next_in(stream, slots[0]).to(device=device, dtype=dtype).contiguous().view(-1)
            continue
        flat = buffer[: bucket_numel(slots)]
        for slot in slots:
            flat[slot.offset : slot.offset + numel(slot.shape)].copy_(_next_in(stream, slot).reshape(-1))  # casts
        yield flat
    for name, _ in stream:  # runs the stream to its end (a ZeRO-3 stream leaves its last gather)
        raise RuntimeError(f"weight stream: {name} is not in the layout")


def _next_in(stream: Iterator[tuple[str, torch.Tensor]], slot: Slot) -> torch.Tensor:
    """The stream's next tensor, which must be `slot`'s (name and shape)."""
    name, tensor = next(stream, (None, None))
    if name != slot.name or tuple(tensor.shape) != slot.shape:
        got = "the end" if name is None else f"{name} {tuple(tensor.shape)}"
        raise RuntimeError(f"weight stream: {got} where the layout has {slot.name} {slot.shape}")
    return tensor


def flatten_to_buckets(
    state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int
) -> list[tuple[torch.Tensor, list[Slot]]]:
    """Every bucket of `state` at once (see `iter_buckets`)."""
    return list(iter_buckets(state, dtype, bucket_bytes))


def unpack(flat: torch.Tensor, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """name -> a view of `flat` [n] in the tensor's shape (no copy)."""
    return {name: flat[offset : offset + numel(shape)].view(shape) for name, shape, offset in slots}


def copy_into(targets: dict[str, torch.Tensor], flat: torch.Tensor, slots: list[Slot]) -> None:
    """Each slot of `flat` into the same-named tensor of `targets`, cast to that tensor's dtype, in place."""
    with torch.no_grad():
        for name, view in unpack(flat, slots).items():
            targets[name].copy_(view)


def check_layout(plan: list[list[Slot]], targets: dict[str, torch.Tensor]) -> None:
    """The learner's bucket plan against a worker's own tensors: the same names and shapes, or one line."""
    sent = {s.name: tuple(s.shape) for b in plan for s in b}
    missing = [k for k in targets if k not in sent]
    unexpected = [k for k in sent if k not in targets]
    wrong = [k for k in sent if k in targets and tuple(targets[k].shape) != sent[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weight group: the learner's policy does not match the rollout model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped; first: {(missing + unexpected + wrong)[0]})"
        )


def share_bucket(flat: torch.Tensor) -> tuple:
    """A small picklable handle to `flat` [n] for another process on this host (`open_bucket`), built by
    torch's own reductions (torch.multiprocessing.reductions): CUDA, an IPC handle to its device memory; CPU,
    the shared-memory file its storage is moved to (the `file_system` strategy, which any process can open,
    unlike a file descriptor). The sender keeps `flat` alive and unchanged until the receiver has copied it."""
    from torch.multiprocessing import get_sharing_strategy, set_sharing_strategy
    from torch.multiprocessing.reductions import reduce_storage, reduce_tensor

    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()  # filled before the other process reads it
        return ("cuda", *reduce_tensor(flat))
    previous = get_sharing_strategy()
    set_sharing_strategy("file_system")
    try:
        storage = reduce_storage(flat.untyped_storage())  # (rebuild, args): a file name, not the bytes
    finally:
        set_sharing_strategy(previous)
    dtype = str(flat.dtype).removeprefix("torch.")
    return ("cpu", storage, dtype, flat.storage_offset(), tuple(flat.shape), flat.stride())


def open_bucket(handle: tuple, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sender's bucket of a `share_bucket` handle, mapped (no copy); CUDA on this process's `device`
    (the same GPU, which each colocated actor may number differently)."""
    if handle[0] == "cuda":
        rebuild, args = handle[1], list(handle[2])
        index = torch.device(device).index
        args[6] = index if index is not None else torch.cuda.current_device()  # rebuild_cuda_tensor's device
        return rebuild(*args)
    _, (rebuild, args), dtype, offset, shape, stride = handle
    return torch.empty(0, dtype=getattr(torch, dtype)).set_(rebuild(*args), offset, shape, stride)


def state_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of `state` in `dtype`: sum of numel x itemsize."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() for v in state.values()) * itemsize


def backend_for(device: str) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


class GroupBroken(RuntimeError):
    """A broadcast of the weight group failed (a member died or closed its side); this member's side is
    closed: the group must be formed anew."""


class WeightGroup:
    """One member of the weight group: rank 0 (`WeightGroup.host_store`, then `join`) sends, ranks 1..R
    (`WeightGroup.connect`) receive. The process group is a standalone one: it never touches the
    default group (the learners' DeepSpeed group in rank 0's process)."""

    LAYOUT_KEY = "layout"
    RANK_KEY = "next_rank"

    def __init__(self, store: dist.Store, host: str, port: int, world_size: int, rank: int | None, timeout_s: float):
        self.store, self.host, self.port, self.world_size = store, host, port, world_size
        self.timeout = timedelta(seconds=timeout_s)
        self.rank = rank if rank is not None else int(store.add(self.RANK_KEY, 1))  # workers draw 1..R
        if not 0 <= self.rank < world_size:
            raise ConfigError(f"weight group: rank {self.rank} outside a group of {world_size} (too many workers)")
        self.group: dist.ProcessGroup | None = None
        self.layout: list[list[Slot]] | None = None  # rank 0's, read once by a worker
        self.dtype: torch.dtype | None = None

    @classmethod
    def host_store(cls, host: str, world_size: int, timeout_s: float = 600.0) -> WeightGroup:
        """Rank 0: a TCPStore on a port the OS picks (no race for a free port); returns at once."""
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)  # fmt: skip
        return cls(store, host, store.port, world_size, rank=0, timeout_s=timeout_s)

    @classmethod
    def connect(cls, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> WeightGroup:
        """A worker: the store of rank 0 at host:port; its rank drawn from the store."""
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        return cls(store, host, port, world_size, rank=None, timeout_s=timeout_s)

    def join(self, backend: str) -> int:
        """Build the process group (every member at once: it waits for all); returns this member's rank."""
        store = dist.PrefixStore("weights", self.store)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(store, self.rank, self.world_size)
        elif backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            # a local group stays on the loopback interface; otherwise the interface gloo would pick
            loopback = self.host in LOOPBACK_HOSTS
            device = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback else None
            options._devices = [device or dist.ProcessGroupGloo.create_default_device()]
            self.group = dist.ProcessGroupGloo(store, self.rank, self.world_size, options)
        else:
            raise ConfigError(f"weight_sync.backend: 'gloo' or 'nccl', got {backend!r}")
        return self.rank

    def send(self, state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int, device: str = "cpu") -> int:
        """Rank 0: `state` cast to `dtype`, bucket by bucket (`send_stream` over its items)."""
        shapes = [(k, tuple(v.shape)) for k, v in state.items()]
        return self.send_stream(shapes, iter(state.items()), dtype, bucket_bytes, device)

    def send_stream(
        self,
        shapes: list[tuple[str, tuple[int, ...]]],
        stream: Iterator[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        bucket_bytes: int,
        device: torch.device | str = "cpu",
    ) -> int:
        """Rank 0: the tensors of `stream` (e.g. `Learner.iter_policy`, in the order of `shapes`: name, full
        shape) through one reused bucket on `device` (`fill_buckets`), each bucket broadcast when full; returns
        the bytes broadcast. The layout is planned from `shapes` alone, so it is published before anything is
        gathered; the stream is run to its end."""
        assert self.group is not None and self.rank == 0, "send: rank 0 after join()"
        if self.layout is None:  # once, before the first bucket: the workers wait for it in the store
            self.publish_layout(shapes, dtype, bucket_bytes)
        if dtype != self.dtype:
            raise RuntimeError(f"weight group: layout published in {self.dtype}, asked to send {dtype}")
        sent = 0
        try:
            for flat in fill_buckets(self.layout, stream, dtype, bucket_bytes, device):
                self.broadcast(flat.view(torch.uint8))  # bytes: any dtype, any backend
                sent += flat.numel() * flat.element_size()
                del flat  # a tensor sent as itself is dropped before the stream makes the next one
        except GroupBroken:
            for _ in stream:  # the other learner ranks still gather every tensor with this one
                pass
            raise
        return sent

    def publish_layout(self, shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, bucket_bytes: int) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.layout, self.dtype = plan_buckets(shapes, itemsize, bucket_bytes), dtype
        buckets = [[[s.name, list(s.shape), s.offset] for s in b] for b in self.layout]
        text = json.dumps({"dtype": str(dtype).removeprefix("torch."), "buckets": buckets})
        self.store.set(self.LAYOUT_KEY, text)

    def read_layout(self, targets: dict[str, torch.Tensor]) -> None:
        """A worker: rank 0's plan, checked against its own tensors (names and shapes)."""
        plan = json.loads(self.store.get(self.LAYOUT_KEY))
        self.dtype = getattr(torch, plan["dtype"])
        self.layout = [[Slot(n, tuple(s), o) for n, s, o in b] for b in plan["buckets"]]
        check_layout(self.layout, targets)

    def receive(self, targets: dict[str, torch.Tensor], device: str = "cpu") -> int:
        """A worker: every bucket into `targets` (name -> tensor, e.g. `model.state_dict()`), in place;
        returns the bytes received."""
        assert self.group is not None and self.rank > 0, "receive: a worker after join()"
        if self.layout is None:
            self.read_layout(targets)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        received = 0
        for slots in self.layout:
            flat = torch.empty(bucket_numel(slots) * itemsize, dtype=torch.uint8, device=device)
            self.broadcast(flat)
            copy_into(targets, flat.view(self.dtype), slots)
            received += flat.numel()
        return received

    def broadcast(self, flat: torch.Tensor) -> None:
        """One bucket (uint8 [n]) from rank 0 to every member; a failure closes this member's side and
        raises `GroupBroken`."""
        try:
            self.group.broadcast(flat, 0).wait()
        except RuntimeError as e:  # gloo / nccl: a peer's connection closed, or the timeout passed
            self.close()
            raise GroupBroken(f"weight group: broadcast failed at rank {self.rank} ({e})") from e

    def close(self) -> None:
        """Leave the group: abort its connections (members blocked on this one fail at once) and drop it
        and the store (rank 0's store goes down with it). Safe to call twice."""
        if self.group is not None:
            with contextlib.suppress(RuntimeError):  # nothing left to abort on a broken group
                self.group.abort()
        self.group, self.store = None, None
