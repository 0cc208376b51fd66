"""Bucketed weight sync: the packing by hand, then a real gloo group (this process as learner rank 0, two
spawned rollout workers) moving the tiny policy in bf16."""

import multiprocessing

import pytest
import torch

from alignment.weight_sync import (
    Slot,
    WeightGroup,
    copy_into,
    flatten_to_buckets,
    plan_buckets,
    state_bytes,
    unpack,
)


def _three() -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),  # 6 elements
        "b": torch.tensor([0.1, 0.2, 0.3, 0.4]),  # 4
        "c": torch.arange(5, dtype=torch.float32) + 100.5,  # 5
    }


def test_plan_puts_tensors_in_order_until_the_byte_limit():
    # bf16 (2 B), 20 B per bucket = 10 elements: a (6) + b (4) fill bucket 0 exactly, c (5) opens bucket 1
    plan = plan_buckets([("a", (2, 3)), ("b", (4,)), ("c", (5,))], itemsize=2, bucket_bytes=20)
    assert plan == [[Slot("a", (2, 3), 0), Slot("b", (4,), 6)], [Slot("c", (5,), 0)]]
    # 19 B: b no longer fits after a; a tensor over the limit (c, 10 B > 8 B) still gets a bucket of its own
    assert plan_buckets([("a", (2, 3)), ("b", (4,))], 2, 19) == [[Slot("a", (2, 3), 0)], [Slot("b", (4,), 0)]]
    assert plan_buckets([("c", (5,))], 2, 8) == [[Slot("c", (5,), 0)]]


def test_flatten_casts_and_unpack_gives_the_tensors_back():
    state = _three()
    buckets = flatten_to_buckets(state, torch.bfloat16, bucket_bytes=20)
    assert [(flat.dtype, flat.numel()) for flat, _ in buckets] == [(torch.bfloat16, 10), (torch.bfloat16, 5)]
    first, slots = buckets[0]
    # 0.1, 0.2, 0.3, 0.4 are not bf16 numbers: they arrive rounded to 8 significant bits
    assert first.tolist() == [0, 1, 2, 3, 4, 5, 0.10009765625, 0.2001953125, 0.30078125, 0.400390625]
    assert buckets[1][0].tolist() == [100.5, 101.5, 102.5, 103.5, 104.5]
    views = unpack(first, slots)
    assert views["a"].shape == (2, 3) and views["a"].data_ptr() == first.data_ptr()  # views, no copy
    targets = {k: torch.zeros_like(v) for k, v in state.items()}  # fp32 worker tensors
    for flat, slots in buckets:
        copy_into(targets, flat, slots)
    for k, v in state.items():
        assert torch.equal(targets[k], v.to(torch.bfloat16).float()), k
    assert state_bytes(state, torch.bfloat16) == 15 * 2 and state_bytes(state, torch.float32) == 15 * 4


def _worker(host: str, port: int, world_size: int, shapes: dict, out: multiprocessing.Queue) -> None:
    """A rollout worker: fp32 tensors of the policy's shapes (zeros: not the learner's weights)."""
    torch.set_num_threads(1)
    targets = {name: torch.zeros(shape) for name, shape in shapes.items()}
    group = WeightGroup.connect(host, port, world_size, timeout_s=60)
    group.join("gloo")
    received = group.receive(targets)
    out.put((group.rank, received, {k: v.numpy() for k, v in targets.items()}))  # numpy: copied, not shared


def test_bf16_broadcast_moves_exactly_the_policy_bytes_to_every_worker():
    from base_model.checkpoint import build_random

    state = build_random("tiny", seed=0).model.state_dict()  # the learner's policy, fp32
    policy_bytes = sum(v.numel() for v in state.values()) * 2  # numel x 2 B
    assert policy_bytes == 199296 * 2
    group = WeightGroup.host_store("127.0.0.1", world_size=3, timeout_s=60)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    workers = [ctx.Process(target=_worker, args=("127.0.0.1", group.port, 3, shapes, out)) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        group.join("gloo")
        sent = group.send(state, torch.bfloat16, bucket_bytes=64 * 1024)  # several buckets
        results = sorted((out.get(timeout=60) for _ in workers), key=lambda r: r[0])
    finally:
        for w in workers:
            w.join(timeout=30)
    assert len(group.layout) == 7  # 398,592 B in buckets of <= 64 KiB (the largest tensor: 33,408 B)
    assert sent == policy_bytes
    assert [(rank, received) for rank, received, _ in results] == [(1, policy_bytes), (2, policy_bytes)]
    for _, _, targets in results:
        for k, v in state.items():
            got = torch.from_numpy(targets[k])
            assert got.dtype == torch.float32 and torch.equal(got, v.to(torch.bfloat16).float()), k
    assert not torch.equal(
        torch.from_numpy(results[0][2]["lm_head.weight"]), state["lm_head.weight"]
    )  # rounded: bf16 on the wire


def test_a_worker_with_another_model_is_refused_in_one_line():
    group = WeightGroup(store=None, host="h", port=0, world_size=2, rank=1, timeout_s=1)

    class _Store:
        def get(self, key):
            return b'{"dtype": "bfloat16", "buckets": [[["w", [2, 2], 0]]]}'

    group.store = _Store()
    with pytest.raises(Exception, match=r"1 missing, 0 unexpected, 1 mis-shaped; first: v\)$"):
        group.read_layout({"w": torch.zeros(3), "v": torch.zeros(1)})


def _cuda_worker(port: int, shapes: dict, out: multiprocessing.Queue) -> None:
    """The receiving member on cuda:1 with bf16 tensors (a bf16 rollout model); receives twice."""
    torch.cuda.set_device(1)
    targets = {name: torch.zeros(shape, dtype=torch.bfloat16, device="cuda:1") for name, shape in shapes.items()}
    group = WeightGroup.connect("127.0.0.1", port, 2, timeout_s=120)
    group.join("nccl")
    received = [group.receive(targets, "cuda:1") for _ in range(2)]
    torch.cuda.synchronize()
    out.put((received, float(sum(t.double().sum() for t in targets.values()))))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per member)")
def test_nccl_broadcast_of_a_1_gib_bf16_policy_between_two_gpus():
    """8 fp32 tensors of 8192 x 8192 (2 GiB) on cuda:0 travel as 1 GiB of bf16 in 512 MiB buckets; the
    second sync (NCCL set up by the first) is timed and printed."""
    import time

    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:0").manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(8192, 8192, device="cuda:0", generator=g) for i in range(8)}
    policy_bytes = 8 * 8192 * 8192 * 2
    group = WeightGroup.host_store("127.0.0.1", world_size=2, timeout_s=120)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    worker = ctx.Process(target=_cuda_worker, args=(group.port, {k: tuple(v.shape) for k, v in state.items()}, out))
    worker.start()
    try:
        group.join("nccl")
        assert group.send(state, torch.bfloat16, 512 * 2**20, "cuda:0") == policy_bytes
        start = time.perf_counter()
        group.send(state, torch.bfloat16, 512 * 2**20, "cuda:0")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        received, checksum = out.get(timeout=120)
    finally:
        worker.join(timeout=60)
    print(
        f"nccl bf16 sync: {policy_bytes / 2**30:.2f} GiB in {seconds:.3f} s = {policy_bytes / seconds / 1e9:.1f} GB/s"
    )
    assert len(group.layout) == 2 and received == [policy_bytes] * 2
    expected = float(sum(v.to(torch.bfloat16).double().sum() for v in state.values()))
    assert checksum == pytest.approx(expected, rel=1e-9)
