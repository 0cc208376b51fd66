"""The composite reward: score = sum_i weight_i * normalise_i(reward_i), every part kept for logging.

components of the output, per configured reward `name`:
  name            its raw score [B]
  name/normalized the normalised score, when a normalisation is configured
  name/<sub>      the reward's own sub-scores (e.g. geneval/strict, jpeg/size_kb)
Normalisations: `affine` (x - shift) / scale with fixed numbers; `running` (x - mean) / (std + eps)
with mean and std over every score seen so far, this batch included (Welford's update), so early
batches are standardised by themselves; its state travels with `state_dict()` for resumption.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewards.base import NormalizeConfig, RewardFn, RewardOutput, RewardsConfig, build_reward


class RunningNorm:
    """Running mean / variance of every score seen (Welford), used to standardise new scores."""

    def __init__(self, eps: float = 1e-6):
        self.eps, self.count, self.mean, self.m2 = eps, 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Merge batch x [B] into the statistics (Chan et al.'s parallel form of Welford's update)."""
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.double().mean())
        batch_m2 = float(((x.double() - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return (x - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def make_normalizer(config: NormalizeConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """None (identity), a fixed affine map, or a RunningNorm."""
    if config.kind == "none":
        return None
    if config.kind == "affine":
        return lambda x: (x - config.shift) / config.scale
    return RunningNorm(config.eps)


class CompositeReward:
    """Weighted sum of named rewards; one `RewardOutput` whose components hold every part."""

    name = "composite"

    def __init__(self, parts: list[tuple[str, RewardFn, float, NormalizeConfig]]):
        self.names = [name for name, _, _, _ in parts]
        self.rewards = [reward for _, reward, _, _ in parts]
        self.weights = [weight for _, _, weight, _ in parts]
        self.normalizers = [make_normalizer(norm) for _, _, _, norm in parts]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return self.combine(self.score_each(images, prompts))

    def score_each(self, images: torch.Tensor, prompts: list[str]) -> dict[str, RewardOutput]:
        """Every reward's own output, by name (no weighting or normalisation yet)."""
        return {name: reward(images, prompts) for name, reward in zip(self.names, self.rewards)}

    def combine(self, outputs: dict[str, RewardOutput]) -> RewardOutput:
        """Normalise (updating running statistics once per call), weight and sum; keep every part."""
        total = torch.zeros_like(outputs[self.names[0]].scores)  # [B]
        components: dict[str, torch.Tensor] = {}
        for name, weight, norm in zip(self.names, self.weights, self.normalizers):
            out = outputs[name]
            components[name] = out.scores
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
            value = out.scores
            if norm is not None:
                value = components[f"{name}/normalized"] = norm(out.scores).float()
            total += weight * value
        return RewardOutput(scores=total, components=components)

    def state_dict(self) -> dict:
        """Running-normalisation statistics by reward name (empty for stateless normalisations)."""
        return {n: m.state_dict() for n, m in zip(self.names, self.normalizers) if isinstance(m, RunningNorm)}

    def load_state_dict(self, state: dict) -> None:
        for name, norm in zip(self.names, self.normalizers):
            if isinstance(norm, RunningNorm) and name in state:
                norm.load_state_dict(state[name])


def build_composite(config: RewardsConfig, device: str | torch.device | None = None) -> CompositeReward:
    """Every configured reward, built on `device` (default: config.device) in config.dtype."""
    dtype = getattr(torch, config.dtype)
    device = device or config.device
    parts = [(s.name, build_reward(s, device, dtype), s.weight, s.normalize) for s in config.rewards]
    return CompositeReward(parts)
