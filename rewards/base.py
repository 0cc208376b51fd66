"""The reward contract, the reward config schema and the registry of reward families.

A reward is any object with `name: str` and `__call__(images, prompts) -> RewardOutput`:
images are uint8 [B, 3, H, W] (any device), prompts a list of B strings; scores come back as
float32 [B] on the CPU, with any sub-scores under `components`. Each family lives in its own module
that defines a `Config` dataclass (its `params` in YAML) and `build(config, device, dtype) -> reward`;
modules are imported only when a config names them, so open_clip / transformers load on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from core.errors import ConfigError, UserError
from core.pools import PoolConfig
from core.schema import from_dict

# type name -> module that defines `Config` and `build`
REWARD_TYPES: dict[str, str] = {
    "imagereward": "rewards.imagereward",
    "hps": "rewards.hps",
    "pickscore": "rewards.pickscore",
    "clipscore": "rewards.clipscore",
    "aesthetic": "rewards.aesthetic",
    "ocr": "rewards.ocr",
    "geneval": "rewards.geneval",
    "jpeg": "rewards.jpeg",
    "shapes_scene": "rewards.shapes_scene",  # the shapes world's shaped rule reward (training only)
}


@dataclass
class RewardOutput:
    """Scores of a batch plus any named sub-scores, all float32 [B] on the CPU."""

    scores: torch.Tensor  # [B] float32, CPU
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B] float32, CPU


class RewardFn(Protocol):
    """What every reward is: a name and a batched call."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput: ...


@dataclass(frozen=True)
class RequiredFile:
    """A file a reward reads, for `nsalign rewards check`: where it is and where it comes from."""

    key: str  # params key that names it, e.g. "checkpoint"; "" for a file inside an installed package
    path: str
    source: str  # where the published file comes from (hub id / URL / package)
    expected: str  # what it must contain (keys, layout)


@dataclass
class NormalizeConfig:
    """Per-reward normalisation inside the composite: none, fixed affine, or running mean/std."""

    kind: Literal["none", "affine", "running"] = "none"
    shift: float = 0.0  # affine: (x - shift) / scale
    scale: float = 1.0
    eps: float = 1e-6  # running: (x - mean) / (std + eps) over every score seen so far

    def validate(self, where: str) -> None:
        if self.kind == "affine" and self.scale == 0.0:
            raise ConfigError(f"{where}.scale: must be non-zero for an affine normalisation")


@dataclass
class RewardSpec:
    """One configured reward: its name in logs, family, weight in the sum, and family params."""

    name: str
    type: str
    weight: float = 1.0
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"{where}.name: must be a non-empty name without '/', got {self.name!r}")
        self.family_config(where)

    def family_config(self, where: str = "reward") -> Any:
        """`params` parsed into the family's strict Config dataclass (fails naming the bad key)."""
        return from_dict(family_module(self.type, f"{where}.type").Config, self.params, f"{where}.params")


@dataclass
class RewardsConfig:
    """All rewards of a job, the device and dtype they run in, and how many workers hold them."""

    rewards: list[RewardSpec] = field(default_factory=list)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    micro_batch_images: int = 32  # images per forward pass of each reward
    pool: PoolConfig = field(default_factory=PoolConfig)

    def validate(self, where: str) -> None:
        if not self.rewards:
            raise ConfigError(f"{where}.rewards: configure at least one reward")
        names = [r.name for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}.rewards: duplicate reward name '{dup[0]}'")
        if self.micro_batch_images < 1:
            raise ConfigError(f"{where}.micro_batch_images: must be >= 1")
        if self.device.startswith("cuda") and self.pool.kind == "ray" and self.pool.num_gpus_per_worker <= 0:
            raise ConfigError(f"{where}.pool.num_gpus_per_worker: device {self.device} needs a GPU per Ray worker")


def family_module(type_name: str, where: str = "type") -> Any:
    """The module implementing reward family `type_name` (imported on first use)."""
    if type_name not in REWARD_TYPES:
        raise ConfigError(f"{where}: unknown reward type '{type_name}' (known: {', '.join(sorted(REWARD_TYPES))})")
    return importlib.import_module(REWARD_TYPES[type_name])


def build_reward(spec: RewardSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RewardFn:
    """Instantiate one configured reward on `device` (loads its files; raises CheckpointError if absent)."""
    module = family_module(spec.type)
    return module.build(spec.family_config(spec.name), torch.device(device), dtype)


def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Images must be uint8 [B, 3, H, W] with one prompt per image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"rewards take uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise UserError(f"rewards: {images.shape[0]} images but {len(prompts)} prompts")


def reward_table(output: RewardOutput, reward_names: list[str]) -> dict[str, np.ndarray]:
    """RewardOutput -> raw score per configured reward [B] (+ 'composite', the weighted sum)."""
    table = {name: output.components[name].float().numpy() for name in reward_names if name != "composite"}
    table["composite"] = output.scores.float().numpy()
    return table


def reward_metrics(out: RewardOutput) -> dict[str, float]:
    """`reward/mean` of the total and `reward/<component>/mean|std` of every component."""
    metrics = {"reward/mean": float(out.scores.mean()), "reward/std": float(out.scores.std(unbiased=False))}
    for name, values in out.components.items():
        metrics[f"reward/{name}/mean"] = float(values.float().mean())
        metrics[f"reward/{name}/std"] = float(values.float().std(unbiased=False))
    return metrics
