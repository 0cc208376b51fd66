"""The DeepSpeed learner: one class for SFT, Diffusion-DPO and GRPO.

A job gives it micro batches and a loss function `loss_fn(model, micro_batch) -> (loss, metrics)`;
the learner accumulates gradients over the micro batches of one optimizer step, clips, steps, and
skips (and counts) a step whose loss is not finite. DeepSpeed is confined to this file and its three
helpers, alignment/engine_config.py (the engine's config: ZeRO, offload, AdamW), alignment/learner_state.py
(sharded loading, engine state) and alignment/ranks.py (the process group); peft to alignment/lora.py.
World size 1 on a CPU (gloo) up to many GPUs; ZeRO stage, bf16, offload, clipping and the optimizer come
from `LearnerConfig` (alignment/learner_config.py). Under a
launcher (torchrun, deepspeed) every rank builds a Learner on its own share of the data; gradients are
averaged by DeepSpeed and the returned metrics over the ranks, through `all_reduce`, the learner's one
collective, which puts its tensor on the engine's device and checks it is there (NCCL takes no CPU tensor).
`Learner.from_source` builds the policy and the reference under ZeRO-3's zero.Init and loads them
parameter by parameter, so no rank holds a whole fp32 model.

Optional LoRA (`learner.lora`, through peft): adapters are injected into the model in place, only
they train, `policy_weights()` (fp32 CPU dict, checkpoints) and `iter_policy()` (tensor by tensor on the
device, weight sync) give the plain model's keys with the adapters merged in, and the frozen reference
(`reference()`) is the same model with the adapters disabled.

Network: the process group is alignment/ranks.py (`init_distributed`).

Trust: the engine state a resume reads (`step_N/engine/`, torch pickles written by DeepSpeed) is data
that may come from elsewhere, and loading it runs no code: DeepSpeed's checkpoint engine is replaced by
one loading with weights_only=True (tensors, plain containers and the three DeepSpeed types of
`deepspeed_safe_globals`); anything else stops the resume with one line. The client state we store
with it is two ints. A resume on another number of ranks with learner.reshard_on_resume=universal goes
through DeepSpeed's universal checkpoint, whose converter and loader run under the same rule
(learner_state.torch_load_weights_only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignment.engine_config import deepspeed_config, offload_config, reference_config  # noqa: F401  (re-exported)
from alignment.learner_config import LearnerConfig, lr_lambda
from alignment.learner_state import (
    UNIVERSAL,
    convert_to_universal,
    iter_policy,
    load_parameters,
    merged_state_dict,
    policy_shapes,
    read_world_record,
    torch_load_weights_only,
    universal_refusal,
    weights_only_checkpoint_engine,
    world_size_change,
    write_world_record,
    zero_init,
)
from alignment.lora import apply_lora, lora_layers
from alignment.ranks import init_distributed, launched  # noqa: F401  (launched: re-exported)
from core.errors import CheckpointError

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def require_device(tensor: torch.Tensor, device: torch.device) -> None:
    """Stop before a collective whose tensor is not on `device` (the engine's): NCCL would fail later with
    "No backend type associated with device type cpu"; gloo would silently accept it."""
    if tensor.device.type != device.type or device.index not in (None, tensor.device.index):
        raise RuntimeError(f"collective on a tensor on {tensor.device}, but the engine runs on {device}")


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


class Learner:
    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        reference: bool = False,
        reference_model: torch.nn.Module | None = None,
    ):
        """reference=True keeps a frozen copy of the starting model for `reference()` (LoRA needs none): a deep
        copy of `model`, or `reference_model` when given (built and loaded apart, see `from_source`)."""
        import deepspeed

        init_distributed()
        self.config = config
        self._reference = None
        if reference and config.lora is None:
            self._reference = self._frozen(reference_model if reference_model is not None else copy.deepcopy(model))
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        if config.gradient_checkpointing and hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(True)
        params = [p for p in model.parameters() if p.requires_grad]
        ds_config = offload_config(config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        self._load_weights_only()
        self.lr_factor = lr_lambda(config)  # applied by hand: ZeRO's optimizer wrapper is no torch Optimizer
        self.step_count = 0
        self.nonfinite_in_a_row = 0
        self.num_skipped = 0
        if self._reference is not None and config.zero_stage != 3:
            self._reference.to(self.engine.device)

    @classmethod
    def from_source(
        cls,
        build: Callable[[], torch.nn.Module],
        read: Callable[[str], torch.Tensor],
        config: LearnerConfig,
        reference: bool = False,
        where: str = "model",
    ) -> Learner:
        """A learner whose policy (and frozen reference) are built by `build()` and filled by `read(key)` one
        parameter at a time (alignment/learner_state.py): under ZeRO-3 inside deepspeed.zero.Init, so each rank
        allocates its partition only and no rank ever holds the whole model; the reference is built and
        loaded the same way, never a copy of a full model."""
        init_distributed()
        with zero_init(config, deepspeed_config(config)):
            model = build()
        load_parameters(model, read, where, cls._rank())
        ref = None
        if reference and config.lora is None:
            with zero_init(config, reference_config(config)):
                ref = build()
            load_parameters(ref, read, where, cls._rank())
        return cls(model.train(), config, reference=reference, reference_model=ref)

    def _frozen(self, ref: torch.nn.Module) -> torch.nn.Module:
        """`ref` as the no-grad eval reference; under ZeRO-3 partitioned by a DeepSpeed inference engine."""
        ref = ref.eval().requires_grad_(False)
        if self.config.zero_stage != 3:
            return ref.to(torch.bfloat16) if self.config.bf16 else ref
        import deepspeed

        engine, *_ = deepspeed.initialize(model=ref, config=reference_config(self.config))
        return engine.module

    @staticmethod
    def _rank() -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @property
    def device(self) -> torch.device:
        """The engine's device: where every collective's tensor must live (NCCL takes CUDA tensors only)."""
        return torch.device(self.engine.device)

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

    def all_reduce(self, values: torch.Tensor, op: Any = None) -> torch.Tensor:
        """The learner's one collective: `values` created anew on the engine's device, checked to be there
        (a CPU tensor under NCCL fails on the GPU; this check fails it on gloo too), then all-reduced (sum by
        default) over the ranks. Returns the reduced tensor (on the engine's device)."""
        tensor = values.detach().to(self.device, copy=True)
        require_device(tensor, self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM if op is None else op)
        return tensor

    def mean_over_ranks(self, metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean of each metric over the ranks (every rank passes the same keys)."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([weight] + [weight * float(metrics[k]) for k in keys], dtype=torch.float64)
        values = self.all_reduce(values).cpu()
        total = values[0].item()
        return {k: (values[i + 1].item() / total if total > 0 else float("nan")) for i, k in enumerate(keys)}

    def _all_ranks(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = self.all_reduce(torch.tensor([1.0 if flag else 0.0]), op=torch.distributed.ReduceOp.MIN)
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
        """Full fp32-on-CPU state dict of the plain policy (ZeRO-3 gathered, LoRA merged), for checkpoints.
        Collective under ZeRO-3: every rank calls it; rank0_only leaves the others' dict empty."""
        return merged_state_dict(self.engine.module, keep=not rank0_only or self.rank == 0)

    def policy_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, full shape) of each tensor `iter_policy` yields, in order, known without gathering."""
        return policy_shapes(self.engine.module)

    def iter_policy(
        self, dtype: torch.dtype, device: torch.device | None = None, every_rank: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The plain policy one tensor at a time in `dtype` on the engine's device (or `device`), for weight sync
        (learner_state.iter_policy): collective under ZeRO-3, so every rank runs it to the end; rank 0 alone
        gets tensors (`every_rank`: each rank, e.g. to hand them to the worker on its own GPU), each valid until
        the next is asked for."""
        keep = every_rank or self.rank == 0
        return iter_policy(self.engine.module, dtype, self.device if device is None else device, keep)

    def _load_weights_only(self) -> None:
        """Every file engine.load_checkpoint reads goes through the engine's checkpoint engine (model states
        through SDLoader, ZeRO partitions, optimizer states; DeepSpeed's other torch.load calls serve universal
        checkpoints, read under `torch_load_weights_only` in `load_universal`, and MoE, which this learner never
        configures): make it load weights-only."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        current = self.engine.checkpoint_engine
        if type(current) is not TorchCheckpointEngine:
            raise RuntimeError(f"DeepSpeed chose checkpoint engine {type(current).__name__}; expected its torch engine")
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()(self.engine._config)

    def save_state(self, directory: Path) -> None:
        """Engine (optimizer, ZeRO partitions) + step counters into directory/engine, and (rank 0) the world
        record: ranks, ZeRO stage, counters. The client state stays two plain ints: loading it back needs
        nothing beyond weights_only."""
        client = {"step_count": int(self.step_count), "num_skipped": int(self.num_skipped)}
        self.engine.save_checkpoint(str(directory / "engine"), tag="state", client_state=client)
        if self.rank == 0:
            write_world_record(directory / "engine", self.world_size, self.config.zero_stage, client)

    def load_state(self, directory: Path) -> None:
        """Engine state and step counters from directory/engine, loaded weights-only (see `_load_weights_only`);
        a missing, unreadable or tampered state is a one-line CheckpointError. State written by another number
        of ranks is one line too, unless learner.reshard_on_resume: "universal" converts it and keeps the
        optimizer state (`load_universal`), "weights" (or true) restarts the optimizer (`reshard_from`)."""
        engine_dir = directory / "engine"
        if not (engine_dir / "state").is_dir():
            raise CheckpointError(f"{engine_dir / 'state'}: no DeepSpeed state in this checkpoint")
        saved = read_world_record(engine_dir)
        if saved is not None and saved["world_size"] != self.world_size:
            mode = self.config.reshard_mode
            if mode == "off":
                raise world_size_change(directory, saved, self.world_size, self.config.zero_stage)
            if mode == "weights":
                self.reshard_from(directory, saved)
            else:
                self.load_universal(directory, saved)
            return
        _, client = self.engine.load_checkpoint(str(engine_dir), tag="state")
        self._restore_counters(engine_dir, client)

    def _restore_counters(self, engine_dir: Path, client: dict | None) -> None:
        """step_count and num_skipped from the client state saved with the engine (two non-negative ints)."""
        counters = {k: (client or {}).get(k) for k in ("step_count", "num_skipped")}
        if not all(type(v) is int and v >= 0 for v in counters.values()):
            raise CheckpointError(f"{engine_dir}: step counters missing or not integers ({counters})")
        self.step_count = counters["step_count"]
        self.num_skipped = counters["num_skipped"]

    def load_universal(self, directory: Path, saved: dict[str, int]) -> None:
        """Continue from checkpoint `directory` written by another number of ranks with its whole optimizer state:
        rank 0 converts engine/state once into DeepSpeed's universal checkpoint (engine/universal, per parameter:
        fp32 master weights, Adam's exp_avg / exp_avg_sq and step; reused by a later resume) while the other
        ranks wait, then every rank loads its own partition of it, with the step counters. Not for ZeRO-0, nor
        across ZeRO stages: one line naming the alternatives (`universal_refusal`)."""
        refusal = universal_refusal(directory, saved, self.config.zero_stage)
        if refusal is not None:
            raise refusal
        engine_dir = directory / "engine"
        failure = None
        if self.rank == 0:
            try:
                convert_to_universal(engine_dir)
            except CheckpointError as e:
                failure = e
        if not self._all_ranks(failure is None):  # every rank stops together, rank 0 with the reason
            raise failure or CheckpointError(f"{engine_dir}: rank 0 could not convert it to a universal checkpoint")
        self.engine._config.load_universal_checkpoint = True  # read at load time only (checkpoint.load_universal)
        try:
            with torch_load_weights_only():
                _, client = self.engine.load_checkpoint(str(engine_dir / UNIVERSAL), tag="state")
        finally:
            self.engine._config.load_universal_checkpoint = False  # this learner's own checkpoints stay per-rank
        self._restore_counters(engine_dir, client)
        if self.rank == 0:
            print(f"resharded {directory.name}: saved by {saved['world_size']} ranks, resumed on {self.world_size} "
                  "with its optimizer state (DeepSpeed universal checkpoint)")  # fmt: skip

    def reshard_from(self, directory: Path, saved: dict[str, int]) -> None:
        """Continue from checkpoint `directory` written by another number of ranks: the policy takes its
        published weights (directory/model, the plain model every checkpoint has; fp32 unless the run is
        bf16), parameter by parameter as `from_source` loads; the optimizer starts afresh (Adam moments
        zero) and the step counters come from the world record, so the learning-rate schedule continues."""
        if self.config.lora is not None:
            raise CheckpointError(f"{directory}: learner.reshard_on_resume=weights needs full fine-tuning (the "
                                  "published weights have the LoRA adapters merged in); resume on "
                                  f"{saved['world_size']} ranks, or use reshard_on_resume=universal")  # fmt: skip
        from alignment.model_source import lazy_reader
        from base_model.checkpoint import load_config

        model_dir = directory / "model"
        read, _ = lazy_reader(model_dir, load_config(model_dir))
        load_parameters(self.model, read, str(model_dir), self.rank)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO / bf16 keep fp32 master weights apart from the module's
            refresh()
        self.step_count, self.num_skipped = saved["step_count"], saved["num_skipped"]
        if self.rank == 0:
            print(f"resharded {directory.name}: saved by {saved['world_size']} ranks, resumed on {self.world_size} "
                  "from its published weights with a fresh optimizer")  # fmt: skip
