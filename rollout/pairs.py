"""Preference-pair strategies over one prompt's group of G scored samples (docs/algorithms.md §9).

Each strategy is a pure function of the group's score table -> a list of (chosen, rejected) sample
indices. Ranking is by the primary reward, descending, ties broken by sample index, and a pair is
only made where the chosen sample scores strictly higher (an equal pair carries no preference).

- nextstep   (NextStep-1's recipe, the default): winner drawn uniformly from the top `top_k` (4),
             loser from the remaining G - top_k (12); `pairs_per_prompt` distinct pairs.
- best_worst the best against the worst sample.
- margin     every pair whose primary gap is at least `margin`, largest gaps first.
- agreement  every pair that all of `agreement_rewards` rank the same way as the primary (with the
             primary gap at least `margin`), largest primary gaps first.
`pairs_per_prompt` caps margin/agreement (0 = no cap). Randomness comes from a generator seeded by
(run seed, prompt id), so a prompt redone after a crash gets the same pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from core.errors import ConfigError

Strategy = Literal["nextstep", "best_worst", "margin", "agreement"]
Pair = tuple[int, int]  # (chosen sample index, rejected sample index) within the group


@dataclass
class PairConfig:
    strategy: Strategy = "nextstep"
    primary: str = "imagereward"  # reward name that ranks the samples ('composite': the weighted sum)
    pairs_per_prompt: int = 1  # nextstep: pairs drawn; margin / agreement: at most this many (0 = all)
    top_k: int = 4  # nextstep: the winner comes from the top_k, the loser from the rest
    margin: float = 0.0  # margin / agreement: minimum primary-score gap
    agreement_rewards: list[str] = field(default_factory=list)  # agreement: must rank like the primary

    def validate(self, where: str = "pairs") -> None:
        if self.pairs_per_prompt < 0 or (self.strategy == "nextstep" and self.pairs_per_prompt < 1):
            raise ConfigError(f"{where}.pairs_per_prompt: must be >= 1 for nextstep (>= 0 otherwise)")
        if self.top_k < 1:
            raise ConfigError(f"{where}.top_k: must be >= 1, got {self.top_k}")
        if self.margin < 0:
            raise ConfigError(f"{where}.margin: must be >= 0, got {self.margin}")
        if self.strategy == "agreement" and not self.agreement_rewards:
            raise ConfigError(f"{where}.agreement_rewards: name the rewards that must agree with the primary")

    def check_group(self, samples_per_prompt: int, where: str = "pairs") -> None:
        """Sizes that cannot work with G samples per prompt fail at load."""
        if samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt: pairs need >= 2 samples per prompt, got {samples_per_prompt}")
        if self.strategy == "nextstep":
            rest = samples_per_prompt - self.top_k
            if rest < 1:
                raise ConfigError(f"{where}.top_k: {self.top_k} leaves no loser among {samples_per_prompt} samples")
            if self.pairs_per_prompt > self.top_k * rest:
                raise ConfigError(
                    f"{where}.pairs_per_prompt: {self.pairs_per_prompt} > {self.top_k} x {rest} distinct pairs"
                )


def rank(scores: np.ndarray) -> np.ndarray:
    """scores [G] -> sample indices best first (ties: lower index first)."""
    return np.lexsort((np.arange(len(scores)), -scores))


def nextstep_pairs(scores: np.ndarray, rng: np.random.Generator, top_k: int, num_pairs: int) -> list[Pair]:
    """Winner uniform over the top_k, loser uniform over the rest; `num_pairs` distinct pairs."""
    order = rank(scores)
    top, rest = order[:top_k], order[top_k:]
    cells = rng.choice(len(top) * len(rest), size=num_pairs, replace=False)  # distinct (winner, loser) cells
    pairs = [(int(top[c // len(rest)]), int(rest[c % len(rest)])) for c in cells]
    return [(w, l) for w, l in pairs if scores[w] > scores[l]]


def best_worst_pairs(scores: np.ndarray) -> list[Pair]:
    order = rank(scores)
    best, worst = int(order[0]), int(order[-1])
    return [(best, worst)] if scores[best] > scores[worst] else []


def margin_pairs(scores: np.ndarray, margin: float, max_pairs: int = 0) -> list[Pair]:
    """All (i, j) with scores[i] - scores[j] >= margin (and > 0), largest gap first."""
    return _largest_gaps(scores, np.ones((len(scores), len(scores)), dtype=bool), margin, max_pairs)


def agreement_pairs(primary: np.ndarray, others: list[np.ndarray], margin: float, max_pairs: int = 0) -> list[Pair]:
    """Pairs the primary prefers by >= margin AND every other reward ranks the same way (strictly)."""
    agree = np.ones((len(primary), len(primary)), dtype=bool)
    for scores in others:
        agree &= scores[:, None] > scores[None, :]  # [G, G]: reward prefers i over j
    return _largest_gaps(primary, agree, margin, max_pairs)


def _largest_gaps(scores: np.ndarray, allowed: np.ndarray, margin: float, max_pairs: int) -> list[Pair]:
    gap = scores[:, None] - scores[None, :]  # [G, G]
    ok = allowed & (gap > 0) & (gap >= margin)
    i, j = np.nonzero(ok)  # row-major: ties in gap keep (i, j) order
    order = np.argsort(-gap[i, j], kind="stable")
    pairs = [(int(i[k]), int(j[k])) for k in order]
    return pairs[:max_pairs] if max_pairs > 0 else pairs


def prompt_rng(run_seed: int, prompt_id: str) -> np.random.Generator:
    """The pair-drawing generator of one prompt: a pure function of (run seed, prompt id)."""
    digest = hashlib.sha1(f"pairs:{run_seed}:{prompt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def select_pairs(config: PairConfig, table: dict[str, np.ndarray], rng: np.random.Generator) -> list[Pair]:
    """table: reward name -> scores [G] of one group (must hold config.primary) -> (chosen, rejected) pairs."""
    primary = table[config.primary]
    if config.strategy == "nextstep":
        return nextstep_pairs(primary, rng, config.top_k, config.pairs_per_prompt)
    if config.strategy == "best_worst":
        return best_worst_pairs(primary)
    if config.strategy == "margin":
        return margin_pairs(primary, config.margin, config.pairs_per_prompt)
    others = [table[name] for name in config.agreement_rewards if name != config.primary]
    return agreement_pairs(primary, others, config.margin, config.pairs_per_prompt)
