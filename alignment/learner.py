"""The DeepSpeed learner: one class for SFT, Diffusion-DPO and GRPO.

A job gives it micro batches and a loss function `loss_fn(model, micro_batch) -> (loss, metrics)`;
the learner accumulates gradients over the micro batches of one optimizer step, clips, steps, and
skips (and counts) a step whose loss is not finite. DeepSpeed is confined to this file (peft to alignment/lora.py).
World size 1 on a CPU (gloo) up to many GPUs; ZeRO stage, bf16, clipping and the optimizer come
from `LearnerConfig` (alignment/learner_config.py). Under a launcher (torchrun, deepspeed) every rank
builds a Learner on its own share of the data; gradients are averaged by DeepSpeed and the returned
metrics over the ranks.

Optional LoRA (`learner.lora`, through peft): adapters are injected into the model in place, only
they train, `policy_weights()` returns the plain model's keys with the adapters merged in, and the
frozen reference (`reference()`) is the same model with the adapters disabled.

Network: a lone process (no launcher) opens no port reachable from outside. `init_distributed` sets up
its world-size-1 group through an in-memory `HashStore` (env:// would start a TCPStore on MASTER_PORT,
listening on every interface) and puts the backend's own sockets (gloo's listener, NCCL's bootstrap) on
the loopback interface. Under a launcher (torchrun, deepspeed) DeepSpeed initialises env:// as the
launcher set it up: that rendezvous listens on the network by design (torch's and the cluster's concern).

Trust: the engine state a resume reads (`step_N/engine/`, torch pickles written by DeepSpeed) is data
that may come from elsewhere, and loading it runs no code: DeepSpeed's checkpoint engine is replaced by
one loading with weights_only=True (tensors, plain containers and the three DeepSpeed types of
`deepspeed_safe_globals`); anything else stops the resume with one line. The client state we store
with it is two ints.
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alignment.learner_config import LearnerConfig, lr_lambda
from alignment.lora import apply_lora, lora_layers
from core.errors import CheckpointError, ConfigError

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


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
            return torch.load(path, map_location=map_location, weights_only=True)
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


class NonFiniteLossError(RuntimeError):
    """`max_consecutive_nonfinite` non-finite losses in a row: the job stops (the trainer names the last good
    checkpoint)."""


@dataclass
class StepResult:
    """What one `Learner.step` did: `updated` False when the attempt was skipped for a non-finite loss (no
    optimizer update, gradients dropped); `metrics` named `area/name`, averaged over micro batches and ranks
    (a skipped attempt reports `train/skipped_nonfinite` only)."""

    updated: bool
    metrics: dict[str, float]


def _is_zero3_param(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")


def _gathered(tensors: list[torch.Tensor]):
    """ZeRO-3 parameters gathered in full for reading (a no-op for ordinary tensors)."""
    params = [t for t in tensors if _is_zero3_param(t)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def merged_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Plain-model state dict, fp32 on CPU: LoRA merged (W + alpha/r * B @ A), ZeRO-3 gathered tensor by tensor.

    With keep=False (ranks other than 0) the collective gathers still happen but nothing is copied.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        with _gathered([tensor]):
            if keep:
                out[key.replace(".base_layer.", ".")] = tensor.detach().float().cpu().clone()
    for name, layer in lora_layers(model):
        for adapter in layer.active_adapters:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # [r, in], [out, r]
            with _gathered([a, b]):
                if keep:
                    out[f"{name}.weight"] += layer.scaling[adapter] * (b.detach().float() @ a.detach().float()).cpu()
    return out


class Learner:
    def __init__(self, model: torch.nn.Module, config: LearnerConfig, reference: bool = False):
        """reference=True keeps a frozen copy of the starting model for `reference()` (LoRA needs none)."""
        import deepspeed

        init_distributed()
        self.config = config
        self._reference = None
        if reference and config.lora is None:
            self._reference = self._frozen_copy(model)
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        if config.gradient_checkpointing and hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(True)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # our micro batches are opaque objects; we scale losses
            "gradient_accumulation_steps": 1,
            "gradient_clipping": config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": config.lr,
                    "betas": list(config.adam_betas),
                    "weight_decay": config.weight_decay,
                    "torch_adam": True,
                },
            },  # fmt: skip
            "steps_per_print": 10**9,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        self._load_weights_only()
        self.lr_factor = lr_lambda(config)  # applied by hand: ZeRO's optimizer wrapper is no torch Optimizer
        self.step_count = 0
        self.nonfinite_in_a_row = 0
        self.num_skipped = 0
        if self._reference is not None and config.zero_stage != 3:
            self._reference.to(self.engine.device)

    def _frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A no-grad eval copy of the starting weights; under ZeRO-3 partitioned by a DeepSpeed inference engine."""
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        if self.config.zero_stage != 3:
            return ref.to(torch.bfloat16) if self.config.bf16 else ref
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": self.config.bf16},
        }  # fmt: skip
        engine, *_ = deepspeed.initialize(model=ref, config=ds_config)
        return engine.module

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean_over_ranks(self, metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean of each metric over the ranks (every rank passes the same keys)."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([weight] + [weight * float(metrics[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        total = values[0].item()
        return {k: (values[i + 1].item() / total if total > 0 else float("nan")) for i, k in enumerate(keys)}

    def _all_ranks(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference model under no_grad: the policy with LoRA adapters disabled, else the copy
        kept at construction (`reference=True`)."""
        if self.config.lora is None and self._reference is None:
            raise RuntimeError("this learner keeps no reference (pass reference=True or use LoRA)")
        if self._reference is not None:
            with torch.no_grad():
                yield self._reference
            return
        layers = [layer for _, layer in lora_layers(self.model)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # peft also restores requires_grad of the active adapters

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn) -> StepResult:
        """One optimizer update over `micro_batches` (gradient accumulation by loss scaling), or none when a
        loss is not finite on any rank (every rank skips together)."""
        self.engine.train()
        totals: dict[str, float] = {}
        n = len(micro_batches)
        finite = True
        for i, mb in enumerate(micro_batches):
            # our micro batches vary in number, so DeepSpeed runs with gradient_accumulation_steps 1 and is told
            # where the boundary is: without this, ZeRO-1/2 reduce each backward into the same gradient
            # partition and keep only the last micro batch's gradient
            self.engine.set_gradient_accumulation_boundary(i == n - 1)
            # what engine.forward does first (our losses call the module's own methods): ZeRO-3 counts micro
            # steps here, and at micro step 0 it overwrites the gradient partition instead of adding to it
            clear_seen = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
            if clear_seen is not None:
                clear_seen()
            loss, metrics = loss_fn(self.engine.module, mb)
            if not self._all_ranks(bool(torch.isfinite(loss.detach()).item())):  # every rank skips together
                finite = False
                break
            self.engine.backward(loss / n)
            for k, v in {"train/loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        if not finite:
            self.engine.optimizer.zero_grad()
            self.nonfinite_in_a_row += 1
            self.num_skipped += 1
            if self.nonfinite_in_a_row >= self.config.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite_in_a_row} non-finite losses in a row")
            return StepResult(updated=False, metrics={"train/skipped_nonfinite": float(self.num_skipped)})
        self.nonfinite_in_a_row = 0
        lr = self.config.lr * self.lr_factor(self.step_count)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        # DeepSpeed reports the norm only when ZeRO computes it; without ZeRO the full gradients are here
        local_norm = self.unpartitioned_grad_norm() if self.config.zero_stage == 0 else None
        self.engine.step()
        self.step_count += 1
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = grad_norm if grad_norm is not None else local_norm
        totals["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["train/lr"] = lr
        totals["train/skipped_nonfinite"] = float(self.num_skipped)
        return StepResult(updated=True, metrics=self.mean_over_ranks(totals))

    def unpartitioned_grad_norm(self) -> float:
        """L2 norm over every trainable parameter's gradient before clipping (ZeRO stage 0: full gradients)."""
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def policy_weights(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Full fp32-on-CPU state dict of the plain policy (ZeRO-3 gathered, LoRA merged), for rollout workers
        and checkpoints. Collective under ZeRO-3: every rank calls it; rank0_only leaves the others' dict empty."""
        return merged_state_dict(self.engine.module, keep=not rank0_only or self.rank == 0)

    def _load_weights_only(self) -> None:
        """Every file engine.load_checkpoint reads goes through the engine's checkpoint engine (model states
        through SDLoader, ZeRO partitions, optimizer states; DeepSpeed's other torch.load calls serve
        universal checkpoints and MoE, which this learner never configures): make it load weights-only."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        current = self.engine.checkpoint_engine
        if type(current) is not TorchCheckpointEngine:
            raise RuntimeError(f"DeepSpeed chose checkpoint engine {type(current).__name__}; expected its torch engine")
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()(self.engine._config)

    def save_state(self, directory: Path) -> None:
        """Engine (optimizer, ZeRO partitions) + step counters into directory/engine. The client state
        stays two plain ints: loading it back needs nothing beyond weights_only."""
        client = {"step_count": int(self.step_count), "num_skipped": int(self.num_skipped)}
        self.engine.save_checkpoint(str(directory / "engine"), tag="state", client_state=client)

    def load_state(self, directory: Path) -> None:
        """Engine state and step counters from directory/engine, loaded weights-only (see `_load_weights_only`);
        a missing, unreadable or tampered state is a one-line CheckpointError."""
        engine_dir = directory / "engine"
        if not (engine_dir / "state").is_dir():
            raise CheckpointError(f"{engine_dir / 'state'}: no DeepSpeed state in this checkpoint")
        _, client = self.engine.load_checkpoint(str(engine_dir), tag="state")
        counters = {k: (client or {}).get(k) for k in ("step_count", "num_skipped")}
        if not all(type(v) is int and v >= 0 for v in counters.values()):
            raise CheckpointError(f"{engine_dir}: step counters missing or not integers ({counters})")
        self.step_count = counters["step_count"]
        self.num_skipped = counters["num_skipped"]
