"""Small pieces of the GRPO job (alignment/jobs/grpo.py): the per-step rollout seed, the trained-part
weights over the (token, head step) grid, the soft value of a prefix, the rollout worker's seeded
entry points, and batch joins.

Shapes: B samples, T image tokens, K head steps, P prompts x G samples per prompt (B = P * G).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from alignment.losses import MaskKind, prefix_phase, soft_value, step_weights, trained_mask
from base_model.generate import decode_tokens, sample_prompts
from rewards.base import RewardOutput
from rollout.batch import RolloutBatch, sample_seed
from rollout.prompts import Prompt
from rollout.worker import RolloutWorker


@dataclass
class TrainPartConfig:
    """Which (token, head step) cells get a loss (algorithms.md §3) and how they are weighted."""

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


def rollout_seed(run_seed: int, step: int) -> int:
    """Run seed of the rollouts of GRPO step `step`: fresh noise every step, the same after a resume."""
    digest = hashlib.sha1(f"grpo:{run_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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


def continuation_seeds(sample_seeds: torch.Tensor, num_continuations: int, run_seed: int, step: int) -> torch.Tensor:
    """Seeds [B, C] of the continuations of each sample's prefix at GRPO step `step`: a pure function
    of (sample seed, continuation index, run seed, step), so a resumed run draws the same ones."""
    step_seed = int.from_bytes(hashlib.sha1(f"grpo-continuation:{run_seed}:{step}".encode()).digest()[:4], "little")
    return torch.tensor(
        [[sample_seed(str(int(s)), c, step_seed) for c in range(num_continuations)] for s in sample_seeds.tolist()],
        dtype=torch.long,
    )  # fmt: skip


def prefix_values(continuation_rewards: torch.Tensor, eta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """continuation_rewards [B, C] -> soft values V [B] = eta log mean_c exp(R_c / eta), and their metrics."""
    values = soft_value(continuation_rewards, eta)  # [B]
    return values, {
        "grpo/soft_value/mean": float(values.mean()), "grpo/soft_value/std": float(values.std(unbiased=False)),
        "grpo/continuation_reward/mean": float(continuation_rewards.mean()),
    }  # fmt: skip


class GrpoRolloutWorker(RolloutWorker):
    """A RolloutWorker whose rollouts take the step's run seed, so every GRPO step draws fresh noise
    while a sample stays a pure function of (prompt id, sample index, run seed, step, weights)."""

    def rollout_step(self, prompts: list[Prompt], samples_per_prompt: int, step_seed: int) -> RolloutBatch:
        self.run_seed = step_seed
        return self.rollout(prompts, samples_per_prompt, record_chains=True)

    def continue_prefixes(self, prompts: list[str], prefix_tokens: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Images uint8 [b, 3, S, S]: prompts[i] continued from prefix_tokens[i] [m, 64] with seeds[i]."""
        out = []
        for s in range(0, len(prompts), self.micro_batch_samples):
            e = s + self.micro_batch_samples
            res = sample_prompts(self.bundle, prompts[s:e], seeds[s:e], self.sampling,
                                 prefix_tokens=prefix_tokens[s:e].to(self.device))  # fmt: skip
            out.append(decode_tokens(self.bundle, res.tokens, self.sampling.image_size))
        return torch.cat(out)


def split_prompts(prompts: list[Prompt], num_parts: int) -> list[list[Prompt]]:
    """Consecutive, near-equal chunks of whole prompts (groups stay on one worker)."""
    n = min(num_parts, len(prompts))
    size, extra = divmod(len(prompts), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(prompts[start:end])
        start = end
    return out


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """Rollouts of consecutive prompt chunks -> one batch; group ids renumbered across chunks."""
    offsets, groups = 0, []
    for p in parts:
        groups.append(p.group_ids + offsets)
        offsets += int(p.group_ids.max()) + 1
    return RolloutBatch(
        prompts=[s for p in parts for s in p.prompts], prompt_ids=[s for p in parts for s in p.prompt_ids],
        group_ids=torch.cat(groups), seeds=torch.cat([p.seeds for p in parts]),
        tokens=torch.cat([p.tokens for p in parts]), chains=torch.cat([p.chains for p in parts]),
        log_probs=torch.cat([p.log_probs for p in parts]), images=torch.cat([p.images for p in parts]),
        policy_version=parts[0].policy_version, sampling=parts[0].sampling,
    )  # fmt: skip


def reward_metrics(out: RewardOutput) -> dict[str, float]:
    """`reward/mean` of the total and `reward/<component>/mean|std` of every component."""
    metrics = {"reward/mean": float(out.scores.mean()), "reward/std": float(out.scores.std(unbiased=False))}
    for name, values in out.components.items():
        metrics[f"reward/{name}/mean"] = float(values.float().mean())
        metrics[f"reward/{name}/std"] = float(values.float().std(unbiased=False))
    return metrics
