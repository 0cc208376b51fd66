"""Re-forming the weight group after a rollout worker dies: learner rank 0 (this process) and two workers
(spawned processes) sync the tiny policy; one worker dies after its first bucket of the next sync, which
fails in one line at rank 0 and the survivor; rank 0 hosts a fresh store, the survivor and a new worker
join it, and the same version then arrives whole at both."""

import multiprocessing
import time

import pytest
import torch

from alignment.weight_sync import GroupBroken, WeightGroup
from tests.distributed_helpers import DiesAfter

BUCKET_BYTES = 64 * 1024  # the tiny policy in bf16 (398,592 B): 7 buckets


def _member(commands: multiprocessing.Queue, out: multiprocessing.Queue, name: str, shapes: dict) -> None:
    """A rollout worker obeying `commands`: ('join', port, world), ('receive',), ('die_after', n) (the
    next receive ends the process after n buckets), None (stop). Reports (name, what, ...) on `out`."""
    torch.set_num_threads(1)
    targets = {k: torch.zeros(shape) for k, shape in shapes.items()}  # fp32: not the learner's weights
    group = None
    while (command := commands.get(timeout=120)) is not None:
        if command[0] == "join":
            if group is not None:
                group.close()  # a survivor drops the group it was in
            group = WeightGroup.connect("127.0.0.1", command[1], command[2], timeout_s=30)
            out.put((name, "joined", group.join("gloo")))
        elif command[0] == "die_after":
            group.group = DiesAfter(group.group, command[1])
        else:
            try:
                received = group.receive(targets)
            except GroupBroken as e:
                out.put((name, "broken", str(e)))
                continue
            out.put((name, "received", received, {k: v.numpy().copy() for k, v in targets.items()}))


def _reports(out: multiprocessing.Queue, n: int) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in (out.get(timeout=120) for _ in range(n))}


def test_a_group_re_formed_with_a_new_member_moves_the_same_bytes_to_survivor_and_newcomer():
    from base_model.checkpoint import build_random

    first = build_random("tiny", seed=0).model.state_dict()  # policy version 0, fp32
    second = {k: v + 0.5 for k, v in first.items()}  # version 1
    policy_bytes = 199296 * 2  # numel x 2 B
    shapes = {k: tuple(v.shape) for k, v in first.items()}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    commands = {name: ctx.Queue() for name in ("a", "b", "c")}
    procs = {name: ctx.Process(target=_member, args=(q, out, name, shapes)) for name, q in commands.items()}
    try:
        rank0 = WeightGroup.host_store("127.0.0.1", world_size=3, timeout_s=30)
        for name in ("a", "b"):
            procs[name].start()
            commands[name].put(("join", rank0.port, 3))
        rank0.join("gloo")
        assert sorted(r[1] for r in _reports(out, 2).values()) == [1, 2]
        for name in ("a", "b"):
            commands[name].put(("receive",))
        assert rank0.send(first, torch.bfloat16, BUCKET_BYTES) == policy_bytes
        assert {name: r[:2] for name, r in _reports(out, 2).items()} == {
            "a": ("received", policy_bytes), "b": ("received", policy_bytes)}  # fmt: skip

        # version 1: b dies after its first bucket; rank 0 and a each fail in one line, well before the timeout
        commands["b"].put(("die_after", 1))
        for name in ("a", "b"):
            commands[name].put(("receive",))
        start = time.perf_counter()
        with pytest.raises(GroupBroken, match=r"^weight group: broadcast failed at rank 0 "):
            rank0.send(second, torch.bfloat16, BUCKET_BYTES)
        survivor = _reports(out, 1)
        seconds = time.perf_counter() - start
        procs["b"].join(timeout=30)
        assert procs["b"].exitcode == 1 and rank0.group is None  # rank 0 closed its side
        assert survivor["a"][0] == "broken" and survivor["a"][1].startswith("weight group: broadcast failed at rank")
        assert seconds < 20, f"the failure took {seconds:.1f} s to reach rank 0 and the survivor"

        # a fresh store; the survivor and a newcomer join it; version 1 again
        rank0 = WeightGroup.host_store("127.0.0.1", world_size=3, timeout_s=30)
        procs["c"].start()
        for name in ("a", "c"):
            commands[name].put(("join", rank0.port, 3))
        rank0.join("gloo")
        assert sorted(r[1] for r in _reports(out, 2).values()) == [1, 2]
        for name in ("a", "c"):
            commands[name].put(("receive",))
        assert rank0.send(second, torch.bfloat16, BUCKET_BYTES) == policy_bytes
        got = _reports(out, 2)
    finally:
        for name, proc in procs.items():
            if proc.is_alive():
                commands[name].put(None)
                proc.join(timeout=30)
    expected = ("received", policy_bytes)
    assert {name: r[:2] for name, r in got.items()} == {"a": expected, "c": expected}
    for name in ("a", "c"):
        for k, v in second.items():
            assert torch.equal(torch.from_numpy(got[name][2][k]), v.to(torch.bfloat16).float()), (name, k)
