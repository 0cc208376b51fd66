"""The learner's DeepSpeed state outside the training step: how weights get in and out, how engine state is
read back, and what a checkpoint records about the ranks that wrote it. Used by alignment/learner.py only.

Sharded builds (ZeRO-3): `zero_init(config)` is deepspeed.zero.Init; a module constructed inside it has
every parameter partitioned over the ranks as it is created (each rank allocates 1/N of it), and
`load_parameters` then fills it one parameter at a time: GatheredParameters(modifier_rank=0) gathers that
one parameter on every rank, rank 0 alone copies the checkpoint's tensor in (read from the memory-mapped
shard), and on leaving DeepSpeed broadcasts rank 0's value and re-partitions it. Peak memory per rank:
its 1/N partition of the model plus the largest single parameter, never the whole fp32 model. Under
ZeRO 0-2 every rank holds the full parameters anyway (only optimizer state / gradients are partitioned),
so the module is built plainly and filled the same way.

Weights out (`iter_policy`): the plain policy one tensor at a time, for weight sync. Each ZeRO-3 parameter
is gathered alone (a LoRA layer's weight with its two factors) on the device it lives on, merged there in
fp32 (W + alpha/r B @ A), cast to the sync dtype and yielded; asking for the next one re-partitions it.
The names and full shapes (`policy_shapes`, from `ds_shape`) are known without gathering anything, so a
bucket layout can be planned before the first tensor. `merged_state_dict` (checkpoints) is the same walk
copied out as fp32 on the CPU.

Trust: DeepSpeed's checkpoint engine is replaced by one loading with weights_only=True (tensors, plain
containers and the three DeepSpeed types of `deepspeed_safe_globals`); anything else is one line.

World size: every checkpoint's `engine/world.json` names the ranks that wrote it, its ZeRO stage and the
step counters. DeepSpeed's ZeRO files are one per rank and cannot be read by another number of ranks:
`world_size_change` turns that into one CheckpointError line, unless learner.reshard_on_resume says how to
go on (alignment/learner.py): "universal" has rank 0 convert the per-rank state once into DeepSpeed's
universal checkpoint (`convert_to_universal`: one file per parameter and state - fp32 master, Adam's
exp_avg and exp_avg_sq, step - that any number of ranks re-partitions as it loads), so the optimizer
state survives; "weights" restarts the optimizer from the checkpoint's published weights. DeepSpeed's
converter and its universal loader call torch.load(weights_only=False) themselves, outside the checkpoint
engine: both run inside `torch_load_weights_only`, so the trust rule above holds for them too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from alignment.learner_config import LearnerConfig
from alignment.lora import lora_layers
from core.errors import CheckpointError
from core.files import atomic_write_text

WORLD_RECORD = "world.json"  # in step_N/engine/
UNIVERSAL = "universal"  # in step_N/engine/: DeepSpeed's universal checkpoint of engine/state, made on a resume
TORCH_LOAD = torch.load  # the real one, kept while `torch_load_weights_only` stands in for it


def deepspeed_safe_globals() -> list[type]:
    """The only types beyond tensors and plain containers in DeepSpeed's checkpoint files, as this learner
    configures it (found with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, bf16 on and
    off, with and without LoRA, DeepSpeed 0.19): ZeRO's optimizer state holds its loss scaler (a plain object
    whose attributes are restored; none of its methods runs), the ZeRO stage (an int enum) and, at stages 1-2,
    fragment addresses (a dataclass of two ints). Stage 0 files hold none of them."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """torch.load with weights_only=True and `deepspeed_safe_globals`; a file holding anything else (a crafted
    pickle names e.g. `builtins.open` or `os.system`) or an unreadable one is a one-line CheckpointError, and
    nothing of it runs."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message spans lines; keep what it refused
        found = re.search(r"GLOBAL (\S+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        what = f"it holds `{found.group(1)}`" if found else detail.group(1).strip() if detail else "not plain data"
        raise CheckpointError(
            f"{path}: not loaded: {what} (DeepSpeed state is tensors and plain data; nothing else is unpickled, "
            "since a pickle can run code)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        first = (str(e) or repr(e)).splitlines()[0]
        raise CheckpointError(f"{path}: unreadable DeepSpeed state ({first})") from None


@functools.cache
def weights_only_checkpoint_engine() -> type:
    """DeepSpeed's torch checkpoint engine, loading through `load_weights_only` (saving unchanged)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine


@contextlib.contextmanager
def torch_load_weights_only() -> Iterator[None]:
    """torch.load is `load_weights_only` for the block, whatever its caller asks: DeepSpeed's universal
    conversion (deepspeed/checkpoint/ds_to_universal.py) and loading (runtime/base_optimizer.py,
    runtime/zero/stage3.py) call torch.load(weights_only=False) directly, bypassing the checkpoint engine."""

    def load(f: Any, map_location: Any = None, **_: Any) -> Any:
        return load_weights_only(f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = TORCH_LOAD


# -- sharded builds --------------------------------------------------------------------------------


def zero_init(config: LearnerConfig, ds_config: dict) -> AbstractContextManager:
    """deepspeed.zero.Init under ZeRO-3 (modules built inside are partitioned as they are created), else
    nothing."""
    if config.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def is_partitioned(t: torch.Tensor) -> bool:
    """Whether `t` is a ZeRO-3 parameter (its data a local partition)."""
    return hasattr(t, "ds_id")


def full_shape(t: torch.Tensor) -> torch.Size:
    return t.ds_shape if is_partitioned(t) else t.shape


def load_parameters(model: torch.nn.Module, read: Callable[[str], torch.Tensor], where: str, rank: int) -> None:
    """Fill `model` with read(key) for every state-dict key, parameter by parameter. A ZeRO-3 parameter is
    gathered alone, written by rank 0 (the only rank that reads it) and re-partitioned; ordinary parameters
    and buffers are copied on every rank. A missing key or a shape that differs is one CheckpointError."""
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not is_partitioned(tensor):
            _copy_checked(tensor, read(key), key, where)
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if rank == 0:
                _copy_checked(tensor, read(key), key, where)


def _copy_checked(target: torch.Tensor, value: torch.Tensor, key: str, where: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise CheckpointError(f"{where}: shape mismatch for {key}: expected {tuple(target.shape)}, "
                              f"found {tuple(value.shape)}")  # fmt: skip
    with torch.no_grad():
        target.data.copy_(value.to(target.dtype))


def local_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model) over the parameters: under ZeRO-3 about 1/N."""
    held = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in model.parameters())
    return held, sum(full_shape(p).numel() for p in model.parameters())


# -- the plain policy, tensor by tensor -------------------------------------------------------------


def gathered(tensors: list[torch.Tensor]) -> AbstractContextManager:
    """The ZeRO-3 parameters among `tensors` gathered in full for reading (nothing for ordinary tensors)."""
    params = [t for t in tensors if is_partitioned(t)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def plain_name(key: str) -> str:
    """The plain model's name of a state-dict key (peft's LoRA wrapper inserts `.base_layer.`)."""
    return key.replace(".base_layer.", ".")


def _plain_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, Any]]:
    """(state-dict key, tensor, the LoRA layer merging into it or None) in state-dict order, adapters left out."""
    merges = {f"{name}.base_layer.weight": layer for name, layer in lora_layers(model)}
    state = model.state_dict(keep_vars=True)
    if not merges.keys() <= state.keys():  # a LoRA layer on something other than a Linear's weight
        raise RuntimeError(f"LoRA layers without a base weight to merge into: {sorted(merges.keys() - state.keys())}")
    return [(k, t, merges.get(k)) for k, t in state.items() if ".lora_" not in k]


def _factors(layer: Any) -> list[torch.Tensor]:
    """A LoRA layer's A [r, in] and B [out, r] of every active adapter (none without a layer)."""
    if layer is None:
        return []
    return [w for ad in layer.active_adapters for w in (layer.lora_A[ad].weight, layer.lora_B[ad].weight)]


def lora_merged(weight: torch.Tensor, layer: Any) -> torch.Tensor:
    """W + scaling * B @ A summed over the active adapters, in fp32 where the tensors lie: [out, in]."""
    merged = weight.detach().to(torch.float32, copy=True)
    for adapter in layer.active_adapters:
        a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()  # [r, in], [out, r]
        merged += (b.float() @ a.float()).mul_(layer.scaling[adapter])  # scaled in place: one fp32 temporary
    return merged


def policy_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(plain name, full shape) of every tensor `iter_policy` yields, in its order, known without gathering
    (a ZeRO-3 parameter carries its full shape as `ds_shape`)."""
    return [(plain_name(k), tuple(full_shape(t))) for k, t, _ in _plain_tensors(model)]


def iter_policy(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None, keep: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain policy (names without `.base_layer.`, LoRA merged) one tensor at a time, in `policy_shapes`
    order: a ZeRO-3 parameter is gathered alone (with its LoRA factors) on its device, merged there in fp32,
    then cast to `dtype` (and moved to `device` when given). A yielded tensor is valid until the next one is
    asked for: the generator then leaves the gather, which re-partitions it. Collective under ZeRO-3: every
    rank runs it to the end; keep=False (ranks other than 0) takes part in the gathers and yields nothing."""
    for key, tensor, layer in _plain_tensors(model):
        with gathered([tensor, *_factors(layer)]):
            if keep:
                value = tensor.detach() if layer is None else lora_merged(tensor, layer)
                yield plain_name(key), value.to(device=device, dtype=dtype)


def merged_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Plain-model state dict, fp32 on CPU (checkpoints): `iter_policy` copied out tensor by tensor.
    keep=False (ranks other than 0): the collective gathers still happen but nothing is copied."""
    return {name: t.to("cpu", copy=True) for name, t in iter_policy(model, torch.float32, keep=keep)}


# -- what a checkpoint records about its ranks -----------------------------------------------------


def write_world_record(engine_dir: Path, world_size: int, zero_stage: int, counters: dict[str, int]) -> None:
    """engine/world.json: the ranks and ZeRO stage that wrote this state, and the step counters."""
    record = {"world_size": world_size, "zero_stage": zero_stage, **counters}
    atomic_write_text(engine_dir / WORLD_RECORD, json.dumps(record, sort_keys=True) + "\n")


def read_world_record(engine_dir: Path) -> dict[str, int] | None:
    """The record of `write_world_record`, or None for a checkpoint written before it existed."""
    path = engine_dir / WORLD_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ok = isinstance(record, dict) and all(type(record.get(k)) is int and record[k] >= 0 for k in
                                              ("world_size", "zero_stage", "step_count", "num_skipped"))  # fmt: skip
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: not a world record (world_size, zero_stage, step_count, num_skipped)")
    return record


def world_size_change(step_dir: Path, saved: dict[str, int], world_size: int, zero_stage: int) -> CheckpointError:
    """The one line when a checkpoint's ZeRO state was written by another number of ranks."""
    return CheckpointError(
        f"{step_dir}: saved by {saved['world_size']} ranks (ZeRO-{saved['zero_stage']}), this job runs "
        f"{world_size} (ZeRO-{zero_stage}); DeepSpeed's per-rank optimizer state is not read by another number "
        f"of ranks: resume on {saved['world_size']} ranks, set learner.reshard_on_resume=universal to convert it "
        f"(ZeRO 1-3, the optimizer state kept), or learner.reshard_on_resume=true to continue from "
        f"{step_dir.name}'s published weights with a fresh optimizer (Adam moments restart)"
    )


def universal_refusal(step_dir: Path, saved: dict[str, int], zero_stage: int) -> CheckpointError | None:
    """Why learner.reshard_on_resume=universal cannot resume this checkpoint, as one line (None: it can).
    DeepSpeed converts ZeRO 1-3 optimizer partitions, and a universal checkpoint is loaded by the stage that
    wrote it (ZeRO-1/2 and ZeRO-3 keep their model states apart). LoRA runs convert like any other: the
    universal checkpoint holds the adapters and their Adam state, the frozen base comes from `model` as
    it does on every resume."""
    if saved["zero_stage"] == 0:
        why = "ZeRO-0 state has no partitions for DeepSpeed to convert"
    elif saved["zero_stage"] != zero_stage:
        why = f"the checkpoint is ZeRO-{saved['zero_stage']} and this job ZeRO-{zero_stage}; use the same stage"
    else:
        return None
    return CheckpointError(
        f"{step_dir}: learner.reshard_on_resume=universal: {why}. Resume on {saved['world_size']} ranks, or set "
        "learner.reshard_on_resume=weights (published weights, fresh optimizer)"
    )


def convert_to_universal(engine_dir: Path) -> Path:
    """engine_dir/universal: DeepSpeed's universal checkpoint of engine_dir/state, converted by its own
    ds_to_universal (in this process, every file read weights-only) unless an earlier resume made it.
    Written as `.universal.tmp-PID` and renamed into place when complete, so a crash or a failure leaves
    nothing under the final name (and the temporary directory is removed). Rank 0 only; the others wait.
    A failure is one CheckpointError line."""
    from deepspeed.checkpoint import ds_to_universal

    final = engine_dir / UNIVERSAL
    if final.is_dir():
        return final
    for stale in engine_dir.glob(f".{UNIVERSAL}.tmp-*"):  # a killed conversion's (the run's lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = engine_dir / f".{UNIVERSAL}.tmp-{os.getpid()}"
    # one worker each: conversion stays in this process, where torch.load is ours; inject_missing_state: the
    # ZeRO-1/2 files hold no universal-checkpoint info (it names tensor/pipeline-parallel layouts we do not use)
    args = argparse.Namespace(input_folder=str(engine_dir / "state"), output_folder=str(tmp / "state"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    log = io.StringIO()  # its progress bars and prints: only the one line of a failure reaches the user
    try:
        with torch_load_weights_only(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        os.replace(tmp, final)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # DeepSpeed's asserts, missing files, a full disk: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e) or type(e).__name__).splitlines()[0]
        raise CheckpointError(f"{engine_dir / 'state'}: DeepSpeed could not convert it to a universal checkpoint "
                              f"({type(e).__name__}: {first})") from None  # fmt: skip
    return final
