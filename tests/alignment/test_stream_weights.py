"""Weight sync as a stream: the policy walked tensor by tensor (`Learner.iter_policy`: a ZeRO-3 parameter
gathered alone, LoRA merged where it lies) into one reused bucket (`fill_buckets`), against the fp32 dict
path it replaces: the same bytes on the wire and the same weights at the worker, for a plain model, LoRA,
ZeRO-3 with and without LoRA, and 2 ZeRO-3 ranks sending to a worker over gloo; bucket boundaries and the
order of gathers and broadcasts by hand."""

import json
import sys
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment.learner import Learner
from alignment.learner_config import LearnerConfig, LoraConfig
from alignment.learner_state import load_parameters, local_numel, plain_name
from alignment.lora import lora_layers
from alignment.model_source import open_model
from alignment.weight_sync import Slot, WeightGroup, copy_into, fill_buckets, flatten_to_buckets, plan_buckets
from base_model.checkpoint import build_random
from tests.distributed_helpers import torchrun

ROOT = Path(__file__).resolve().parents[2]
POLICY_BF16_BYTES = 199296 * 2  # the tiny policy's numel x 2 B
# 16 KiB buckets over tiny's 59 tensors in bf16: 28 buckets. Bucket 0 is embed_tokens alone (261 x 64 x 2 B =
# 33,408 B > 16,384 B); bucket 1 is layer 0's q_proj weight and bias, k_proj weight and bias (8,192 + 128 +
# 4,096 + 64 = 12,480 B; v_proj's 4,096 B more would pass 16,384); five tensors are over 16 KiB and go alone,
# unbuffered; a 16,384 B tensor (the MLP weights) fills the buffer exactly
BUCKET = 16 * 1024
OVER_BUCKET = ["embed_tokens.weight", "lm_head.weight", "image_head.net.time_embed.mlp.0.weight",
               "image_head.net.res_blocks.0.adaLN_modulation.1.weight",
               "image_head.net.res_blocks.1.adaLN_modulation.1.weight"]  # fmt: skip


def _stream(log: list, tensors: dict[str, torch.Tensor]):
    for name, t in tensors.items():
        log.append(("yield", name))
        yield name, t


def test_buckets_are_filled_in_one_buffer_and_a_large_tensor_goes_alone():
    # bf16, 20 B = 10 elements per bucket: a (6) + b (4) fill bucket 0; c (5) + d (12) would pass it, so
    # c is bucket 1; d (24 B > 20 B) is bucket 2, alone: sent as itself, not through the 10-element buffer
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        "c": torch.arange(5, dtype=torch.float32) + 100.5,
        "d": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
    }
    plan = plan_buckets([(k, tuple(v.shape)) for k, v in tensors.items()], itemsize=2, bucket_bytes=20)
    assert plan == [[Slot("a", (2, 3), 0), Slot("b", (4,), 6)], [Slot("c", (5,), 0)], [Slot("d", (3, 4), 0)]]
    log, buckets = [], []
    for i, flat in enumerate(fill_buckets(plan, _stream(log, tensors), torch.bfloat16, bucket_bytes=20)):
        log.append(("bucket", i))
        buckets.append((flat.data_ptr(), flat.clone()))
    # the stream is asked for a tensor only when the bucket being filled needs it: one bucket + one tensor
    assert log == [("yield", "a"), ("yield", "b"), ("bucket", 0), ("yield", "c"), ("bucket", 1), ("yield", "d"),
                   ("bucket", 2)]  # fmt: skip
    assert buckets[0][1].tolist() == [0, 1, 2, 3, 4, 5, 0.10009765625, 0.2001953125, 0.30078125, 0.400390625]
    assert buckets[1][1].tolist() == [100.5, 101.5, 102.5, 103.5, 104.5]
    assert buckets[2][1].tolist() == list(range(12))
    assert buckets[0][0] == buckets[1][0]  # the same buffer, reused
    assert buckets[2][0] == tensors["d"].data_ptr()  # already bf16: no copy at all


def test_a_stream_out_of_step_with_the_layout_is_stopped():
    plan = [[Slot("a", (2,), 0), Slot("b", (1,), 2)]]
    two = {"a": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"weight stream: b \(1,\) where the layout has a \(2,\)$"):
        list(fill_buckets(plan, iter(reversed(two.items())), torch.bfloat16, 100))
    with pytest.raises(RuntimeError, match=r"weight stream: the end where the layout has b \(1,\)$"):
        list(fill_buckets(plan, iter([("a", torch.zeros(2))]), torch.bfloat16, 100))
    with pytest.raises(RuntimeError, match="weight stream: c is not in the layout$"):
        list(fill_buckets(plan, iter([*two.items(), ("c", torch.zeros(1))]), torch.bfloat16, 100))


class _Store:
    def __init__(self):
        self.values = {}

    def set(self, key, value):
        self.values[key] = value


class _Recorder:
    """A process group that records each broadcast: its bytes (a copy, or with keep=False the size), its
    address, and what `probe()` says then."""

    def __init__(self, probe=lambda: None, keep: bool = True):
        self.probe, self.keep, self.sent = probe, keep, []

    def broadcast(self, tensor, root):
        assert root == 0 and tensor.dtype == torch.uint8
        self.sent.append((tensor.clone() if self.keep else tensor.numel(), tensor.data_ptr(), self.probe()))
        return SimpleNamespace(wait=lambda: None)


def _sender(probe=lambda: None, keep: bool = True) -> WeightGroup:
    group = WeightGroup(store=_Store(), host="h", port=0, world_size=2, rank=0, timeout_s=1)
    group.group = _Recorder(probe, keep)
    return group


def _fresh(shapes: list[tuple[str, tuple[int, ...]]], refs: dict, log: list, device: str = "cpu"):
    """A stream that makes each tensor when asked (as a ZeRO-3 gather does) and lets it go before making the
    next (as leaving the gather does); `refs` name -> weakref, `log` who was alive at each yield."""
    for i, (name, shape) in enumerate(shapes):
        log.append((name, sorted(n for n, r in refs.items() if r() is not None)))
        tensor = torch.full(shape, float(i), dtype=torch.bfloat16, device=device)
        refs[name] = weakref.ref(tensor)
        yield name, tensor
        del tensor


def test_the_sender_holds_one_bucket_and_one_streamed_tensor_at_most():
    # bf16, 20 B buckets: [a (6) b (4)] [c (5)] [d (12): 24 B, sent as itself] [e (3)]
    shapes = [("a", (6,)), ("b", (4,)), ("c", (5,)), ("d", (12,)), ("e", (3,))]
    refs, log = {}, []
    sender = _sender(lambda: sorted(n for n, r in refs.items() if r() is not None))
    sent = sender.send_stream(shapes, _fresh(shapes, refs, log), torch.bfloat16, bucket_bytes=20)
    assert sent == 30 * 2 and [len(b) for b in sender.layout] == [2, 1, 1, 1]
    assert log == [(n, []) for n, _ in shapes]  # nothing streamed before is alive when the next is made
    # at each broadcast, only the bucket's last tensor (the stream is suspended on it, as inside a gather)
    assert [(len(wire), alive) for wire, _, alive in sender.group.sent] == [(20, ["b"]), (10, ["c"]), (24, ["d"]),
                                                                            (6, ["e"])]  # fmt: skip
    assert all(r() is None for r in refs.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_sender_peaks_at_one_bucket_plus_one_tensor():
    """8 bf16 tensors of 64 MiB and one of 192 MiB made on the GPU one at a time, in 128 MiB buckets: the
    device memory peaks at the 128 MiB buffer + the 192 MiB tensor (sent as itself), not the 704 MiB policy."""
    mib = 2**20
    shapes = [(f"w{i}", (32 * mib,)) for i in range(8)] + [("big", (96 * mib,))]
    refs, log = {}, []
    sender = _sender(keep=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sent = sender.send_stream(shapes, _fresh(shapes, refs, log, "cuda"), torch.bfloat16, 128 * mib, "cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"stream of 704 MiB in 128 MiB buckets: device peak {peak / mib:.0f} MiB above the start")
    assert sent == 704 * mib and [len(b) for b in sender.layout] == [2, 2, 2, 2, 1]
    assert 192 * mib <= peak <= (128 + 192) * mib
    assert len({ptr for *_, ptr, _ in sender.group.sent[:4]}) == 1  # one buffer for the four full buckets


def _available(model: torch.nn.Module) -> list[str]:
    """The ZeRO-3 parameters gathered right now."""
    return sorted(n for n, p in model.named_parameters() if p.ds_status.name != "NOT_AVAILABLE")


def _own_params(name: str, model: torch.nn.Module) -> list[str]:
    """The parameters that make plain tensor `name`: itself, or a LoRA layer's base weight and factors."""
    layer = name.removesuffix(".weight")
    return sorted(n for n, _ in model.named_parameters()
                  if plain_name(n) == name or n.startswith(layer + ".lora_"))  # fmt: skip


def _learner(stage: int, lora: bool) -> tuple[Learner, dict[str, torch.Tensor]]:
    """The tiny policy (seed 0) at ZeRO `stage`, built partitioned under ZeRO-3; with LoRA every adapter's A and
    B set to random values (B starts at zero), and the merged fp32 weights that should come out, by hand."""
    source = open_model("tiny", seed=0)
    start = {k: source.read(k) for k in source.keys}
    adapters = LoraConfig(rank=4, alpha=8.0, target_modules=["mlp.0", "final_layer.linear"]) if lora else None
    learner = Learner.from_source(source.build, source.read, LearnerConfig(zero_stage=stage, lora=adapters))
    g = torch.Generator().manual_seed(1)
    expected = dict(start)
    for name, layer in lora_layers(learner.model) if lora else []:
        a, b = (torch.randn(*shape, generator=g) for shape in ((4, layer.in_features), (layer.out_features, 4)))
        for factor, value in ((layer.lora_A["default"], a), (layer.lora_B["default"], b)):
            load_parameters(factor, {"weight": value}.__getitem__, "test", rank=0)  # ZeRO-3: gathered, set, re-split
        expected[f"{name}.weight"] = start[f"{name}.weight"] + 2.0 * (b @ a)  # alpha / rank = 8 / 4
    return learner, expected


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage, lora", [(0, False), (2, True), (3, False), (3, True)])
def test_the_stream_sends_the_bytes_of_the_dict_path_and_gathers_one_parameter_at_a_time(stage, lora):
    learner, expected = _learner(stage, lora)
    model, zero3 = learner.model, stage == 3
    probe = (lambda: _available(model)) if zero3 else (lambda: None)
    log = []

    def watched(stream):
        for name, tensor in stream:
            assert tensor.dtype == torch.bfloat16 and tensor.device == learner.device
            log.append((name, probe()))
            yield name, tensor

    streamed = _sender(probe)
    shapes = learner.policy_shapes()
    sent = streamed.send_stream(shapes, watched(learner.iter_policy(torch.bfloat16)), torch.bfloat16, BUCKET)
    weights = learner.policy_weights()  # the dict path: fp32 on the CPU
    by_dict = _sender()
    assert sent == by_dict.send(weights, torch.bfloat16, BUCKET) == POLICY_BF16_BYTES
    assert streamed.layout == by_dict.layout and len(streamed.layout) == 28
    assert streamed.layout[0] == [Slot("embed_tokens.weight", (261, 64), 0)]
    assert [(s.name.removeprefix("layers.0.self_attn."), s.offset) for s in streamed.layout[1]] == [
        ("q_proj.weight", 0),
        ("q_proj.bias", 4096),
        ("k_proj.weight", 4160),
        ("k_proj.bias", 6208),
    ]  # elements
    assert [n for n, _ in log] == [n for n, _ in shapes] == list(weights) and set(weights) == set(expected)
    assert shapes == [(k, tuple(v.shape)) for k, v in weights.items()]
    packed = flatten_to_buckets(weights, torch.bfloat16, BUCKET)  # the packing before streaming
    assert len(streamed.group.sent) == len(by_dict.group.sent) == len(packed) == 28
    targets = {k: torch.zeros(v.shape) for k, v in weights.items()}  # a worker's fp32 model
    for (wire, *_), (dict_wire, *_), (flat, slots) in zip(streamed.group.sent, by_dict.group.sent, packed):
        assert torch.equal(wire, dict_wire) and torch.equal(wire, flat.view(torch.uint8))
        copy_into(targets, wire.view(torch.bfloat16), slots)
    for k, v in expected.items():
        assert torch.equal(targets[k], v.to(torch.bfloat16).float()), k
    # one buffer of 16 KiB for every bucket but the five over it, sent as themselves
    alone = [i for i, b in enumerate(streamed.layout) if b[0].name in OVER_BUCKET]
    assert [streamed.layout[i] for i in alone] == [[Slot(n, tuple(weights[n].shape), 0)] for n in OVER_BUCKET]
    buffered = [streamed.group.sent[i] for i in range(28) if i not in alone]
    assert len({ptr for _, ptr, _ in buffered}) == 1 and max(len(w) for w, *_ in buffered) == BUCKET
    if zero3:  # gathered at each yield and each broadcast: the one tensor being sent, never two
        assert all(seen == _own_params(name, model) for name, seen in log)
        last = {}  # broadcast i happens while the last tensor of bucket i is still gathered
        for name, _ in log:
            last[name] = _own_params(name, model)
        assert [seen for *_, seen in streamed.group.sent] == [last[b[-1].name] for b in streamed.layout]
        assert _available(model) == [] and max(len(s) for _, s in log) == (3 if lora else 1)


@pytest.mark.deepspeed
def test_two_zero3_ranks_stream_the_policy_to_a_worker(tmp_path):
    """GrpoLearnerRank.send_weights on 2 ZeRO-3 ranks (torchrun, gloo): rank 0 streams, rank 1 takes part in
    each gather (and hosts the receiving worker in a thread); the worker ends with the dict path's weights
    in bf16; each rank holds half the policy and rank 0 has one parameter gathered at every broadcast."""
    torchrun("tests.alignment.test_stream_weights", "two_ranks", 2, str(tmp_path), timeout=240)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sent"] for r in reports] == [[POLICY_BF16_BYTES] * 2, [0, 0]]
    assert reports[0]["gathered_at_broadcast"] == [1] * 28 * 2
    assert all(r["held"] <= r["full"] // 2 + 64 * 59 for r in reports)  # 59 parameters, each split in two
    worker = torch.load(tmp_path / "worker.pt", weights_only=True)
    policy = torch.load(tmp_path / "dict_path.pt", weights_only=True)
    assert worker["received"] == [POLICY_BF16_BYTES] * 2
    assert set(worker["weights"]) == set(policy)
    assert all(torch.equal(worker["weights"][k], v.to(torch.bfloat16).float()) for k, v in policy.items())
    start = build_random("tiny", seed=0).model.state_dict()  # what GrpoLearnerRank loaded (seed 0)
    assert all(torch.equal(policy[k], v) for k, v in start.items())


def two_ranks(out: str) -> None:
    """Worker: a ZeRO-3 GrpoLearnerRank on each rank, two syncs; rank 0 sends, and rank 1, besides its part
    of every gather, is the rollout worker (a thread of its own: a member of the weight group, fp32 zeros
    of the policy's shapes). Rank 0 records what it had gathered at each broadcast, and writes the dict
    path's weights."""
    from alignment.grpo_learner import GrpoLearnerRank
    from core.schema import load_config
    from jobs.grpo import GrpoConfig

    overrides = [f"prompts={ROOT / 'configs/grpo/prompts_tiny.txt'}", "learner.zero_stage=3", "beta=0"]
    rank = GrpoLearnerRank(load_config(GrpoConfig, ROOT / "configs/grpo/tiny.yaml", overrides))
    learner = rank.learner
    port = [rank.host_weight_store("127.0.0.1", 2, 120)]
    torch.distributed.broadcast_object_list(port, src=0)  # to rank 1's worker
    worker, received, targets = None, [], {name: torch.zeros(shape) for name, shape in learner.policy_shapes()}
    if learner.rank == 1:
        group = WeightGroup.connect("127.0.0.1", port[0], 2, timeout_s=120)

        def receive():
            group.join("gloo")
            received.extend(group.receive(targets) for _ in range(2))

        worker = threading.Thread(target=receive)
        worker.start()
    rank.join_weight_group("gloo")
    gathered = []
    if rank.weights is not None:
        real = rank.weights.group

        def broadcast(tensor, root):
            gathered.append(len(_available(learner.model)))
            return real.broadcast(tensor, root)

        rank.weights.group = SimpleNamespace(broadcast=broadcast)
    sent = [rank.send_weights("bfloat16", BUCKET) for _ in range(2)]
    if worker is not None:
        worker.join(timeout=120)
        torch.save({"received": received, "weights": targets}, Path(out, "worker.pt"))
    policy = learner.policy_weights(rank0_only=True)  # collective
    if learner.rank == 0:
        torch.save(policy, Path(out, "dict_path.pt"))
    held, full = local_numel(learner.model)
    report = {"sent": sent, "gathered_at_broadcast": gathered, "held": held, "full": full}
    Path(out, f"rank{learner.rank}.json").write_text(json.dumps(report))


WORKERS = {"two_ranks": two_ranks}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
