"""Result directories -> the dashboard's data (one JSON-able dict); every figure is computed here.

The page (dashboard/page.py) only draws what this module computed, so the values it shows are the
ones the tests compare with the Parquet files.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dashboard.data import (
    EvalResults,
    PrefPairs,
    is_eval_dir,
    is_prefs_dir,
    prompt_groups,
    read_eval,
    read_json,
    read_metrics,
    read_prefs,
)
from dashboard.stats import mean_ci, paired_delta_ci, pearson, spearman, win_rate_matrix, within_prompt_diversity


class DashboardError(Exception):
    """Nothing to show, or unreadable inputs (the CLI prints it as one line, exit 2)."""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def discover(paths: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """(eval dirs, run dirs with metrics, preference dataset dirs) found in or just under `paths`."""
    evals, runs, prefs = [], [], []
    for p in paths:
        if not p.is_dir():
            raise DashboardError(f"not a directory: {p}")
        found = False
        for d in [p, p / "select" / "eval", *sorted(c for c in p.iterdir() if c.is_dir())]:
            if is_eval_dir(d) and d not in evals:
                evals.append(d)
                found = True
        if is_prefs_dir(p):
            prefs.append(p)
            found = True
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
            found = True
        if not found:
            raise DashboardError(f"{p}: no results (eval.json, metrics.jsonl or a build-prefs manifest.json)")
    return evals, runs, prefs


def r6(x: float) -> float | None:
    """JSON-safe float (NaN -> None)."""
    return None if x is None or not np.isfinite(x) else float(x)


def image_signals(png: bytes) -> tuple[float, float]:
    """(brightness, saturation) of a thumbnail, both mean over pixels in [0, 1]."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    hsv = np.asarray(img.convert("HSV"), dtype=np.float64) / 255.0  # [H, W, 3]
    return float(np.asarray(img, dtype=np.float64).mean() / 255.0), float(hsv[..., 1].mean())


def cot_pairs(res: EvalResults) -> list[tuple[str, str]]:
    """(with, without): each Self-CoT entry and every entry sampled from the same weights without it."""
    plain = [p for p in res.checkpoints if p not in res.self_cot]
    return [(c, p) for c in res.self_cot for p in plain if res.paths[p] == res.paths[c]]


def eval_section(res: EvalResults, selection: dict | None, baseline: str | None, num_resamples: int,
                 max_grid_prompts: int) -> dict:  # fmt: skip
    """Tables, win rates, distributions, image grid and drift signals of one eval directory."""
    names, rewards = res.checkpoints, res.rewards
    base = baseline if baseline in names else ("base" if "base" in names else names[0])
    boot = dict(num_resamples=num_resamples, seed=0)
    table = {r: [dict(zip(("mean", "lo", "hi"), map(r6, mean_ci(res.scores[r][c], **boot)))) for c in
                 range(len(names))] for r in rewards}  # fmt: skip
    deltas = {
        b: {r: [dict(zip(("delta", "lo", "hi"), map(r6, paired_delta_ci(res.scores[r][c], res.scores[r][bi], **boot))))
                for c in range(len(names))] for r in rewards}
        for bi, b in enumerate(names)
    }  # fmt: skip
    wins = {r: [[r6(v) for v in row] for row in win_rate_matrix(res.scores[r])] for r in rewards}
    first = np.flatnonzero(res.sample_index == res.sample_index.min())  # one image per prompt: the first seed
    grid = [
        {"prompt": res.prompts[i], "prompt_id": res.prompt_ids[i],
         "images": [data_uri(res.thumbnails[c][i]) for c in range(len(names))],
         "reasoning": [res.reasoning[c][i] for c in range(len(names))],  # model output: the page shows it as text
         "scores": {r: [r6(res.scores[r][c, i]) for c in range(len(names))] for r in rewards}}
        for i in first[:max_grid_prompts]
    ]  # fmt: skip
    means = np.array([[res.scores[r][c].mean() for r in rewards] for c in range(len(names))])  # [C, R]
    flat = {r: res.scores[r].ravel() for r in rewards}  # reward -> [C * N]
    drift = []
    for c, name in enumerate(names):
        signals = np.array([image_signals(p) for p in res.thumbnails[c]])  # [N, 2]
        drift.append({"checkpoint": name, "diversity": r6(within_prompt_diversity(prompt_groups(res, c))),
                      "brightness": r6(signals[:, 0].mean()), "saturation": r6(signals[:, 1].mean()),
                      "png_kb": r6(np.mean([len(p) for p in res.thumbnails[c]]) / 1024)})  # fmt: skip
    return {
        "name": str(res.directory), "checkpoints": names, "paths": res.paths, "rewards": rewards,
        "num_rows": len(res.prompt_ids), "num_prompts": len(set(res.prompt_ids)), "complete": res.complete,
        "baseline": base, "table": table, "deltas": deltas, "winrates": wins,
        "dists": {r: [[r6(v) for v in res.scores[r][c]] for c in range(len(names))] for r in rewards},
        "grid": grid, "drift": drift,
        "corr_samples": [[r6(spearman(flat[a], flat[b])) for b in rewards] for a in rewards],
        "corr_means": [[r6(pearson(means[:, i], means[:, j])) for j in range(len(rewards))]
                       for i in range(len(rewards))],
        "selection": selection, "self_cot": res.self_cot,
        "cot_pairs": [{"with": a, "without": b, "deltas": {r: deltas[b][r][names.index(a)] for r in rewards}}
                      for a, b in cot_pairs(res)],
    }  # fmt: skip


def curves_section(run: Path) -> dict:
    """metrics.jsonl -> {metric: [[step, value], ...]} (numeric columns other than step/time)."""
    series: dict[str, list] = {}
    for row in read_metrics(run):
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and np.isfinite(v):
                series.setdefault(k, []).append([row["step"], v])
    return {"name": str(run), "metrics": series}


def prefs_section(p: PrefPairs, max_pairs_shown: int) -> dict:
    """Pair view, score-gap histogram data and agreement between rewards of a preference dataset."""
    gaps = {r: (p.chosen_scores[r] - p.rejected_scores[r]) for r in p.rewards}  # reward -> [M]
    agreement = {r: r6(float(((gaps[r] > 0) + 0.5 * (gaps[r] == 0)).mean())) if len(gaps[r]) else None
                 for r in p.rewards}  # fmt: skip
    pairs = [
        {"prompt": p.prompts[i], "chosen": data_uri(p.chosen_images[i]), "rejected": data_uri(p.rejected_images[i]),
         "chosen_scores": {r: r6(p.chosen_scores[r][i]) for r in p.rewards},
         "rejected_scores": {r: r6(p.rejected_scores[r][i]) for r in p.rewards}}
        for i in range(min(len(p.prompts), max_pairs_shown))
    ]  # fmt: skip
    return {"name": str(p.directory), "rewards": p.rewards, "primary": p.primary, "num_pairs": len(p.prompts),
            "pairs": pairs, "gaps": {r: [r6(v) for v in g] for r, g in gaps.items()},
            "agreement": agreement}  # fmt: skip


def build_data(paths: list[Path], baseline: str | None = None, num_resamples: int = 1000,
               max_grid_prompts: int = 200, max_pairs_shown: int = 24) -> dict:  # fmt: skip
    """Everything the page shows, from the result directories `paths`."""
    evals, runs, prefs = discover(paths)
    sections = []
    for d in evals:
        try:
            res = read_eval(d)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise DashboardError(f"{d}: unreadable evaluation results ({e})") from None
        selection = read_json(d.parent.parent / "selection.json") if d.parent.name == "select" else None
        sections.append(eval_section(res, selection, baseline, num_resamples, max_grid_prompts))
    return {
        "title": "nextstep-align: " + ", ".join(p.name for p in paths),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "evals": sections, "runs": [curves_section(r) for r in runs],
        "prefs": [prefs_section(read_prefs(p), max_pairs_shown) for p in prefs],
    }  # fmt: skip
