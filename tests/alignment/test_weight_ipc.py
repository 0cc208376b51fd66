"""Colocated weight hand-over by handle (`weight_sync.transport: ipc`): this process fills the tiny policy's
bf16 buckets one at a time in one reused buffer, a spawned process maps each by its handle (shared memory on
a CPU, CUDA IPC on a GPU) and copies it into its own fp32 tensors; what arrives equals what a broadcast
delivers, and a handle is a few hundred bytes whatever the bucket's size."""

import multiprocessing
import pickle

import pytest
import torch

from alignment.weight_sync import copy_into, fill_buckets, open_bucket, plan_buckets, share_bucket

BUCKET_BYTES = 64 * 1024  # the tiny policy in bf16 (398,592 B): 7 buckets


def _receiver(inbox: multiprocessing.Queue, acks: multiprocessing.Queue, shapes: dict, device: str) -> None:
    """Maps each (handle bytes, slots) of `inbox` and copies it into fp32 tensors on `device`; acks each
    bucket (the sender may then refill its buffer); sends the tensors back at the end (None)."""
    torch.set_num_threads(1)
    targets = {k: torch.zeros(shape, device=device) for k, shape in shapes.items()}
    while (item := inbox.get(timeout=120)) is not None:
        handle, slots = item
        flat = open_bucket(pickle.loads(handle), device)
        copy_into(targets, flat, slots)
        if device != "cpu":
            torch.cuda.synchronize()
        del flat
        acks.put(_bytes_of(slots))
    acks.put({k: v.cpu().numpy() for k, v in targets.items()})


def _bytes_of(slots) -> int:
    last = slots[-1]
    return (last.offset + int(torch.Size(last.shape).numel())) * 2  # bf16


def _hand_over(state: dict[str, torch.Tensor], device: str) -> tuple[list[int], list[int], dict]:
    """(pickled handle sizes, bytes acked per bucket, the receiver's tensors)."""
    shapes = [(k, tuple(v.shape)) for k, v in state.items()]
    plan = plan_buckets(shapes, 2, BUCKET_BYTES)
    ctx = multiprocessing.get_context("spawn")
    inbox, acks = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(inbox, acks, dict(shapes), device))
    receiver.start()
    sizes, acked = [], []
    try:
        for flat, slots in zip(fill_buckets(plan, iter(state.items()), torch.bfloat16, BUCKET_BYTES, device), plan):
            handle = pickle.dumps(share_bucket(flat))  # what Ray would carry
            sizes.append(len(handle))
            inbox.put((handle, slots))
            acked.append(acks.get(timeout=120))  # the buffer is refilled only after the copy
        inbox.put(None)
        got = acks.get(timeout=120)
    finally:
        receiver.join(timeout=60)
    return sizes, acked, got


def _check(state: dict[str, torch.Tensor], sizes: list[int], acked: list[int], got: dict) -> None:
    assert len(sizes) == 7 and max(sizes) < 2048  # a handle, never the bytes (buckets of up to 64 KiB)
    assert sum(acked) == 199296 * 2  # the policy in bf16: numel x 2 B, as a broadcast moves it
    for k, v in state.items():  # what the broadcast test expects: the bf16 rounding of the learner's fp32
        assert torch.equal(torch.from_numpy(got[k]), v.to(torch.bfloat16).float()), k


def test_buckets_handed_over_through_shared_memory_equal_the_broadcast():
    from base_model.checkpoint import build_random

    state = build_random("tiny", seed=0).model.state_dict()
    _check(state, *_hand_over(state, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buckets_handed_over_by_cuda_ipc_on_one_gpu_equal_the_broadcast():
    from base_model.checkpoint import build_random

    state = {k: v.cuda() for k, v in build_random("tiny", seed=0).model.state_dict().items()}
    _check({k: v.cpu() for k, v in state.items()}, *_hand_over(state, "cuda"))
