"""The learner's collectives (on the engine's device, through one checked helper), its DeepSpeed config
(offload), and ZeRO-3 loading under zero.Init at world size 1 (in process) and 2 (torchrun, gloo)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from alignment.learner import Learner, deepspeed_config, merged_state_dict, require_device
from alignment.learner_config import LearnerConfig
from alignment.learner_state import local_numel
from alignment.model_source import open_model
from base_model.checkpoint import build_random, read_state_dict, save_checkpoint
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import sft_loss
from core.errors import ConfigError
from tests.distributed_helpers import torchrun

pytestmark = pytest.mark.deepspeed


def test_a_collective_tensor_off_the_engine_device_is_refused():
    require_device(torch.zeros(2), torch.device("cpu"))  # where it belongs: passes
    with pytest.raises(RuntimeError, match="collective on a tensor on cpu, but the engine runs on meta"):
        require_device(torch.zeros(2), torch.device("meta"))
    with pytest.raises(RuntimeError, match="on meta, but the engine runs on cpu"):
        require_device(torch.zeros(2, device="meta"), torch.device("cpu"))


class Reached(Exception):
    """Raised by the all_reduce spy: the collective was reached (with the tensor it got)."""


def test_every_collective_of_the_learner_gets_its_tensor_on_the_engine_device(monkeypatch):
    """With the engine's device faked as `meta` and 2 ranks claimed, each learner collective must hand
    torch.distributed a tensor on `meta`: a CPU tensor (the NCCL failure of issue 16) would show here."""
    learner, data, loss_fn = _tiny_learner(stage=0)
    seen = []

    def spy(tensor, op=None, **kwargs):
        seen.append(tensor.device)
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    monkeypatch.setattr(Learner, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(Learner, "world_size", property(lambda self: 2))
    for call in (lambda: learner.mean_over_ranks({"a": 1.0}), lambda: learner._all_ranks(True),
                 lambda: learner.step(data, loss_fn)):  # fmt: skip
        with pytest.raises(Reached):
            call()
    assert seen == [torch.device("meta")] * 3


def test_deepspeed_config_maps_the_offload_keys():
    plain = deepspeed_config(LearnerConfig(zero_stage=2))
    assert plain["zero_optimization"] == {"stage": 2} and plain["optimizer"]["params"]["torch_adam"] is True
    both = deepspeed_config(LearnerConfig(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert both["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                         "offload_param": {"device": "cpu", "pin_memory": True}}  # fmt: skip
    assert "torch_adam" not in both["optimizer"]["params"]  # the offloaded step is DeepSpeed's CPU Adam
    with pytest.raises(ConfigError, match="learner.offload_params: needs zero_stage 3"):
        LearnerConfig(zero_stage=2, offload_params=True).validate()
    with pytest.raises(ConfigError, match="learner.offload_optimizer: needs zero_stage 1, 2 or 3"):
        LearnerConfig(offload_optimizer=True).validate()


def _tiny_learner(stage: int):
    bundle = build_random("tiny", seed=0)
    learner = Learner(bundle.model.train(), LearnerConfig(lr=1e-3, zero_stage=stage))
    data = [(build_prompt_batch(bundle.tokenizer, bundle.ids, ["a caption"], (64, 64), False),
             torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)))]  # fmt: skip

    def loss_fn(model, mb):
        out = sft_loss(model, mb[0], bundle.ids, mb[1], generator=torch.Generator().manual_seed(1))
        return out.loss, {}

    return learner, data, loss_fn


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny model (seed 3, so not what `tiny` builds) in the published layout, several shards."""
    return save_checkpoint(build_random("tiny", seed=3), tmp_path / "ckpt", max_shard_bytes=200_000)


def test_zero3_loading_at_world_size_1_equals_the_checkpoint(checkpoint):
    expected = read_state_dict(checkpoint)
    assert len(list(checkpoint.glob("*.safetensors"))) > 1
    source = open_model(str(checkpoint))
    learner = Learner.from_source(source.build, source.read, LearnerConfig(zero_stage=3), reference=True)
    assert hasattr(next(learner.model.parameters()), "ds_id")  # built partitioned, under zero.Init
    for got in (learner.policy_weights(), merged_state_dict(learner._reference)):
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_zero3_loading_at_2_ranks_shards_the_model_and_equals_the_checkpoint(tmp_path, checkpoint):
    """Each rank holds about half of every parameter; only rank 0 reads the parameters from the shards;
    gathered policy and reference equal the checkpoint; a training step's collectives stay on the device."""
    torchrun("tests.alignment.test_distributed_learner", "zero3_load", 2, str(checkpoint), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["full"]
    for r, report in enumerate(reports):
        assert report["full"] == total and report["held"] <= total // 2 + 64 * report["params"], report
        assert report["reference_held"] == report["held"] and report["updated"] and report["devices"] == ["cpu"]
        assert report["param_reads"] == (report["params"] if r == 0 else 0), report
    assert reports[0]["equal"] == {"policy": True, "reference": True}


def zero3_load(checkpoint: str, out: str) -> None:
    """Worker: load `checkpoint` under ZeRO-3 on every rank, report what this rank holds and read."""
    source = open_model(checkpoint)
    params = {name for name, _ in source.build().named_parameters()}
    reads = []

    def read(key):
        reads.append(key)
        return source.read(key)

    learner = Learner.from_source(source.build, read, LearnerConfig(lr=1e-3, zero_stage=3), reference=True)
    param_reads = len([k for k in reads if k in params]) // 2  # policy and reference each read once
    policy = learner.policy_weights(rank0_only=True)  # collective: gathered tensor by tensor
    reference = merged_state_dict(learner._reference, keep=learner.rank == 0)
    expected = read_state_dict(checkpoint) if learner.rank == 0 else {}
    equal = {name: all(torch.equal(got[k], expected[k]) for k in expected)
             for name, got in (("policy", policy), ("reference", reference))}  # fmt: skip
    devices = set()
    real = torch.distributed.all_reduce

    def checked(tensor, *args, **kwargs):
        devices.add(str(tensor.device))
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = checked
    bundle = source.bundle(learner.model)
    batch = build_prompt_batch(bundle.tokenizer, bundle.ids, ["a caption"], (64, 64), False)
    tokens = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(learner.rank))

    def loss_fn(model, mb):
        return sft_loss(model, mb[0], bundle.ids, mb[1], generator=torch.Generator().manual_seed(1)).loss, {}

    updated = learner.step([(batch, tokens)], loss_fn).updated
    held, full = local_numel(learner.model)
    report = dict(held=held, full=full, params=len(params), param_reads=param_reads, equal=equal, updated=updated,
                  reference_held=local_numel(learner._reference)[0], devices=sorted(devices))  # fmt: skip
    Path(out, f"rank{learner.rank}.json").write_text(json.dumps(report))


WORKERS = {"zero3_load": zero3_load}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
