"""The DeepSpeed learner: one class for SFT, Diffusion-DPO and GRPO.

A job gives it micro batches and a loss function `loss_fn(model, micro_batch) -> (loss, metrics)`;
the learner accumulates gradients over the micro batches of one optimizer step, clips, steps, and
skips (and counts) a step whose loss is not finite. DeepSpeed is confined to this file.
World size 1 on a CPU (gloo) up to many GPUs; ZeRO stage, bf16, clipping and the optimizer come
from `LearnerConfig`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LearnerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 1000  # for the cosine schedule
    max_grad_norm: float = 1.0
    zero_stage: int = 0  # 0-3
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_consecutive_nonfinite: int = 3  # more non-finite losses in a row stop the job

    def validate(self, where: str = "learner") -> None:
        from base_model.errors import ConfigError

        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")


def ensure_single_process_env() -> None:
    """A lone process (no launcher) still needs the rendezvous variables torch.distributed reads."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def lr_lambda(cfg: LearnerConfig) -> Callable[[int], float]:
    """Linear warm-up then constant or cosine decay to 0 at total_steps (multiplier of cfg.lr)."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class NonFiniteLossError(RuntimeError):
    pass


class Learner:
    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig):
        import deepspeed

        ensure_single_process_env()
        self.cfg = cfg
        if cfg.gradient_checkpointing and hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(True)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # our micro batches are opaque objects; we scale losses
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.adam_betas),
                    "weight_decay": cfg.weight_decay,
                    "torch_adam": True,
                },
            },  # fmt: skip
            "steps_per_print": 10**9,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        self.lr_factor = lr_lambda(cfg)  # applied by hand: ZeRO's optimizer wrapper is no torch Optimizer
        self.step_count = 0
        self.nonfinite_in_a_row = 0
        self.num_skipped = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer update over `micro_batches` (gradient accumulation by loss scaling)."""
        self.engine.train()
        totals: dict[str, float] = {}
        n = len(micro_batches)
        finite = True
        for mb in micro_batches:
            loss, metrics = loss_fn(self.engine.module, mb)
            if not torch.isfinite(loss.detach()).item():
                finite = False
                break
            self.engine.backward(loss / n)
            for k, v in {"train/loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        if not finite:
            self.engine.optimizer.zero_grad()
            self.nonfinite_in_a_row += 1
            self.num_skipped += 1
            if self.nonfinite_in_a_row >= self.cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite_in_a_row} non-finite losses in a row")
            return {"train/skipped_nonfinite": float(self.num_skipped)}
        self.nonfinite_in_a_row = 0
        lr = self.cfg.lr * self.lr_factor(self.step_count)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        self.step_count += 1
        grad_norm = self.engine.get_global_grad_norm()
        totals["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["train/lr"] = lr
        totals["train/skipped_nonfinite"] = float(self.num_skipped)
        return totals

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32-on-CPU state dict of the policy, for rollout workers and checkpoints."""
        import deepspeed

        model = self.engine.module
        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        """Engine (optimizer, ZeRO partitions) + step counters into directory/engine."""
        client = {"step_count": self.step_count, "num_skipped": self.num_skipped}
        self.engine.save_checkpoint(str(directory / "engine"), tag="state", client_state=client)

    def load_state(self, directory: Path) -> None:
        _, client = self.engine.load_checkpoint(str(directory / "engine"), tag="state")
        self.step_count = client["step_count"]
        self.num_skipped = client["num_skipped"]
