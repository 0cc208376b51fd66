"""Paired statistics for comparing checkpoints on the same prompts and seeds (pure numpy functions).

Every score table here is paired: row i of two checkpoints' score vectors comes from the same
prompt and seed, so differences are taken row by row before resampling (a paired bootstrap, Efron &
Tibshirani 1993, ch. 13: percentile intervals of the resampled mean). Used by `nsalign select` and by
the dashboard; it lives in the dashboard package because the dashboard may not import training code.
"""

from __future__ import annotations

import numpy as np


def bootstrap_indices(num_rows: int, num_resamples: int, seed: int) -> np.ndarray:
    """Rows drawn with replacement: [num_resamples, num_rows] int. Fixed seed -> the same draws, so
    intervals of several checkpoints (and re-runs) use identical resamples."""
    return np.random.default_rng(seed).integers(0, num_rows, size=(num_resamples, num_rows))


def mean_ci(x: np.ndarray, num_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """x [N] -> (mean, low, high): percentile bootstrap interval of the mean at `level`."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = x[bootstrap_indices(x.size, num_resamples, seed)].mean(axis=1)  # [R]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(low), float(high)


def paired_delta_ci(
    a: np.ndarray, b: np.ndarray, num_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """a, b [N] paired scores -> (mean(a - b), low, high): paired bootstrap interval of the mean gain."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    return mean_ci(a - b, num_resamples, seed, level)


def per_prompt_delta_ci(
    a: np.ndarray,
    b: np.ndarray,
    prompt_ids: list[str],
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """a, b [N] paired scores, prompt_ids [N] -> (mean gain, low, high), resampling prompts rather than rows.

    Seeds of one prompt are not independent draws (they share the prompt's difficulty), so the
    interval treats each prompt as one unit: row differences are averaged per prompt, then those
    per-prompt gains are bootstrapped. The point estimate is the mean over prompts (equal to the row
    mean when every prompt has the same number of seeds).
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.shape != (len(prompt_ids),):
        raise ValueError(f"need one prompt id per row: {diff.shape} rows, {len(prompt_ids)} ids")
    _, group = np.unique(np.asarray(prompt_ids), return_inverse=True)
    per_prompt = np.bincount(group, weights=diff) / np.bincount(group)  # [P]
    return mean_ci(per_prompt, num_resamples, seed, level)


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """a, b [N] paired -> fraction of rows where a beats b, ties counted as half a win."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / a.size)


def win_rate_matrix(scores: np.ndarray) -> np.ndarray:
    """scores [C, N] (checkpoint x paired row) -> [C, C] with W[i, j] = win_rate(scores[i], scores[j])."""
    c = scores.shape[0]
    return np.array([[win_rate(scores[i], scores[j]) for j in range(c)] for i in range(c)])


def mean_pairwise_distance(features: np.ndarray) -> float:
    """features [G, D] of one prompt's G samples -> mean L2 distance over the G(G-1)/2 pairs, / sqrt(D)
    so that it reads as a per-dimension RMS difference. 0 for G < 2."""
    f = np.asarray(features, dtype=np.float64)
    g = f.shape[0]
    if g < 2:
        return 0.0
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)) / np.sqrt(f.shape[1])  # [G, G]
    return float(d[np.triu_indices(g, k=1)].mean())


def within_prompt_diversity(groups: list[np.ndarray]) -> float:
    """One [G, D] feature array per prompt -> mean over prompts of `mean_pairwise_distance`."""
    values = [mean_pairwise_distance(f) for f in groups if f.shape[0] >= 2]
    return float(np.mean(values)) if values else float("nan")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """x, y [N] -> Pearson correlation (nan when either is constant or N < 2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def ranks(x: np.ndarray) -> np.ndarray:
    """x [N] -> average ranks 1..N (ties share the mean of their ranks)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size)
    r[order] = np.arange(1, x.size + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """x, y [N] -> Spearman rank correlation (Pearson of average ranks)."""
    return pearson(ranks(x), ranks(y))
