"""Which (token, head step) cells of a GRPO update get a loss, and with what weight (docs/algorithms.md §7).

TrainPartConfig (`train_part:` of a GRPO config) -> `train_weights` [T, K] of each update: the mask of
`alignment.losses.trained_mask` (full / token_prefix / step_prefix / step_window, the window sliding if
asked), flipped to its complement in the suffix phase of arXiv 2601.02256's alternation, restricted to a
seeded `timestep_fraction` of head steps (Flow-GRPO), times NextFlow's per-token 1 / n_t^alpha. With
`soft_value_samples`, a prefix update's return is the soft value of C continuations of the prefix.

Shapes: B samples, T image tokens, K head steps, C continuations per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.losses import MaskKind, prefix_phase, soft_value, step_weights, trained_mask
from core.errors import ConfigError
from rollout.batch import rollout_seed


@dataclass
class TrainPartConfig:
    """Which (token, head step) cells get a loss (docs/algorithms.md §7) and how they are weighted."""

    kind: MaskKind = "full"
    prefix: int = 0  # token_prefix: image tokens; step_prefix: head steps
    window_start: int = 0  # step_window: first trained head step ...
    window: int = 0  # ... and how many (MixGRPO)
    window_slide_every: int = 0  # step_window: move the window one head step every N GRPO steps (0: fixed)
    # NextFlow's per-step weight k_t = 1 / n_t^alpha, n_t = trained head steps of token t: a token counts
    # n_t^(1 - alpha) times its mean cell loss. 1: the mean over trained cells (Flow-GRPO); NextFlow 0.6-0.9
    # weights updates that train more head steps per token more (e.g. a suffix phase over a step prefix).
    alpha: float = 1.0
    alternate: bool = False  # arXiv 2601.02256: `prefix_updates` prefix steps, then `suffix_updates` on the rest
    prefix_updates: int = 3
    suffix_updates: int = 1
    # arXiv 2601.02256's value of a prefix: in prefix updates, each sample's return is the soft value
    # V = eta log mean_k exp(R_k / eta) of `soft_value_samples` fresh continuations of its first `prefix`
    # tokens (paper: 2, eta 1) instead of its own reward R; suffix updates keep R. 0: off. token_prefix only.
    soft_value_samples: int = 0
    soft_value_eta: float = 1.0

    def check_grid(self, num_tokens: int, num_steps: int, where: str = "train_part") -> None:
        """The part against the (token, head step) grid it masks: T image tokens, K trainable head steps."""
        part, k, t = self, num_steps, num_tokens
        if part.kind == "token_prefix" and not 1 <= part.prefix <= t:
            raise ConfigError(f"{where}.prefix: token_prefix needs 1..{t} image tokens, got {part.prefix}")
        if part.kind == "step_prefix" and not 1 <= part.prefix <= k:
            raise ConfigError(f"{where}.prefix: step_prefix needs 1..{k} head steps, got {part.prefix}")
        if part.kind == "step_window":
            if not 1 <= part.window <= k:
                raise ConfigError(f"{where}.window: needs 1..{k} head steps, got {part.window}")
            if not 0 <= part.window_start <= k - part.window:
                raise ConfigError(f"{where}.window_start: must be in 0..{k - part.window}, got {part.window_start}")
        if part.alternate:
            if part.kind == "full":
                raise ConfigError(f"{where}.alternate: needs a prefix or window kind (full has no suffix)")
            if part.prefix_updates < 1 or part.suffix_updates < 1:
                raise ConfigError(f"{where}: prefix_updates and suffix_updates must be >= 1")
        if part.alpha < 0:
            raise ConfigError(f"{where}.alpha: must be >= 0, got {part.alpha}")
        if part.soft_value_samples < 0:
            raise ConfigError(f"{where}.soft_value_samples: must be >= 0 (0: off), got {part.soft_value_samples}")
        if part.soft_value_samples and part.kind != "token_prefix":
            raise ConfigError(
                f"{where}.soft_value_samples: continuations need a trajectory prefix (kind token_prefix), "
                f"got kind {part.kind}"
            )
        if part.soft_value_eta <= 0:
            raise ConfigError(f"{where}.soft_value_eta: must be > 0, got {part.soft_value_eta}")


@dataclass
class GroupFilterConfig:
    """NextStep-1.1: drop groups that carry no signal (std below min_std) or are already solved."""

    min_std: float = 1e-6
    max_mean: float | None = None


def window_start_at(part: TrainPartConfig, num_steps: int, step: int) -> int:
    """Start of the (possibly sliding) step window at GRPO step `step`, wrapping inside [0, K - window]."""
    if part.window_slide_every <= 0:
        return part.window_start
    return (part.window_start + step // part.window_slide_every) % (num_steps - part.window + 1)


def train_weights(
    part: TrainPartConfig, num_tokens: int, num_steps: int, step: int, timestep_fraction: float, seed: int
) -> torch.Tensor:
    """Weights [T, K] for GRPO step `step`: trained part (flipped to its complement in a suffix phase),
    restricted to a seeded random `timestep_fraction` of head steps (Flow-GRPO), times 1 / n_t^alpha."""
    mask = trained_mask(
        part.kind, num_tokens, num_steps, prefix=part.prefix,
        window_start=window_start_at(part, num_steps, step), window=part.window,
    )  # fmt: skip
    if part.alternate and prefix_phase(step, part.prefix_updates, part.suffix_updates) == "suffix":
        mask = ~mask
    if timestep_fraction < 1.0:
        gen = torch.Generator().manual_seed(rollout_seed(seed + 1, step))
        trained_steps = mask.any(dim=0).nonzero().flatten()  # [K'] head steps with any trained cell
        keep = max(1, round(timestep_fraction * len(trained_steps)))
        chosen = trained_steps[torch.randperm(len(trained_steps), generator=gen)[:keep]]
        columns = torch.zeros(num_steps, dtype=torch.bool)
        columns[chosen] = True
        mask = mask & columns[None, :]
    return step_weights(mask, part.alpha)  # [T, K]


def soft_value_phase(part: TrainPartConfig, update_index: int) -> bool:
    """Whether update `update_index` trains the prefix on its soft value (on, and not a suffix phase)."""
    if part.soft_value_samples < 1:
        return False
    return not (part.alternate and prefix_phase(update_index, part.prefix_updates, part.suffix_updates) == "suffix")


def prefix_values(continuation_rewards: torch.Tensor, eta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """continuation_rewards [B, C] -> soft values V [B] = eta log mean_c exp(R_c / eta), and their metrics."""
    values = soft_value(continuation_rewards, eta)  # [B]
    return values, {
        "grpo/soft_value/mean": float(values.mean()), "grpo/soft_value/std": float(values.std(unbiased=False)),
        "grpo/continuation_reward/mean": float(continuation_rewards.mean()),
    }  # fmt: skip
