"""The learner's config: optimizer, schedule, ZeRO stage, precision, non-finite tolerance, optional LoRA.

Plain dataclasses and the learning-rate schedule; the DeepSpeed engine that reads them is alignment/learner.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from core.errors import ConfigError

# Linear layers of NextStep-1 worth adapting: backbone attention + MLP, the head-condition projector and
# the flow head's MLPs, modulations and output (peft matches a name by its suffix).
DEFAULT_LORA_TARGETS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "image_out_projector",
    "input_proj", "cond_embed", "mlp.0", "mlp.2", "adaLN_modulation.1", "final_layer.linear",
]  # fmt: skip

RESHARD_CHOICES = (False, True, "weights", "universal")  # learner.reshard_on_resume


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def validate(self, where: str = "learner.lora") -> None:
        if self.rank < 1:
            raise ConfigError(f"{where}.rank: must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules: name at least one module")


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
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    offload_optimizer: bool = False  # ZeRO-Offload (ZeRO 1-3): fp32 masters + Adam state stepped in CPU memory
    offload_params: bool = False  # ZeRO-3 parameter partitions in CPU memory, fetched per layer
    # resuming on another number of ranks: false stops; "universal" converts the optimizer state (DeepSpeed's
    # universal checkpoint, ZeRO 1-3); "weights" (or true) takes the published weights with a fresh optimizer
    reshard_on_resume: bool | str = False
    max_consecutive_nonfinite: int = 3  # more non-finite losses in a row stop the job
    lora: LoraConfig | None = None  # null: full fine-tuning

    def validate(self, where: str = "learner") -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{where}.offload_optimizer: needs zero_stage 1, 2 or 3 (got 0)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{where}.offload_params: needs zero_stage 3 (got {self.zero_stage})")
        if self.reshard_on_resume not in RESHARD_CHOICES:
            raise ConfigError(f"{where}.reshard_on_resume: must be false, true, weights or universal, "
                              f"got {self.reshard_on_resume!r}")  # fmt: skip

    @property
    def reshard_mode(self) -> Literal["off", "weights", "universal"]:
        """How a resume on another number of ranks proceeds (`true` is the older spelling of "weights")."""
        if isinstance(self.reshard_on_resume, bool):
            return "weights" if self.reshard_on_resume else "off"
        return self.reshard_on_resume  # type: ignore[return-value]  (validate: "weights" or "universal")


def lr_lambda(config: LearnerConfig) -> Callable[[int], float]:
    """Linear warm-up then constant or cosine decay to 0 at total_steps (multiplier of config.lr)."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
