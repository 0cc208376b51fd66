"""Readers for the result files the dashboard (and `nsalign select`) look at. pyarrow + numpy only.

eval dir     eval.json + scores/<checkpoint>/shard-*.parquet   (nsalign evaluate)
run dir      metrics.jsonl, selection.json, select/eval/       (training jobs, nsalign select)
prefs dir    manifest.json + data/shard-*.parquet              (nsalign build-prefs)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core.formats import EVAL_MANIFEST, PREFS_DATA_DIR, PREFS_MANIFEST, SHARD_GLOB

REASONING = "reasoning"  # rollout/eval_format.py's column; shards written before Self-CoT lack it


@dataclass
class EvalResults:
    """Paired scores of C checkpoints on the same N (prompt, seed) rows."""

    directory: Path
    checkpoints: list[str]  # [C]
    paths: dict[str, str]  # checkpoint name -> directory or preset
    rewards: list[str]  # [R] reward names (incl. 'composite')
    prompt_ids: list[str]  # [N] row key part 1
    sample_index: np.ndarray  # [N] int, row key part 2
    prompts: list[str]  # [N]
    scores: dict[str, np.ndarray]  # reward -> [C, N] float64
    thumbnails: list[list[bytes]]  # [C][N] PNG bytes
    complete: bool  # every checkpoint had every row (otherwise rows are the common ones)
    reasoning: list[list[str | None]]  # [C][N] the text a Self-CoT entry wrote before the image (None: without)
    self_cot: list[str]  # the checkpoints sampled with Self-CoT (eval.json; [] before Self-CoT existed)


def is_eval_dir(path: Path) -> bool:
    return (path / EVAL_MANIFEST).is_file()


def read_scores(files: list[Path]) -> pa.Table:
    """One checkpoint's shards -> one table; a shard without the reasoning column gets it, all null."""
    tables = []
    for f in files:
        t = pq.read_table(f)
        if REASONING not in t.column_names:
            t = t.append_column(REASONING, pa.nulls(t.num_rows, pa.string()))
        tables.append(t)
    return pa.concat_tables(tables)


def read_eval(directory: str | Path, names: list[str] | None = None) -> EvalResults:
    """Rows of checkpoints `names` (default: all in eval.json), aligned on (prompt id, sample index)."""
    directory = Path(directory)
    manifest = json.loads((directory / EVAL_MANIFEST).read_text())
    names = list(manifest["checkpoints"]) if names is None else names
    rewards = list(manifest["rewards"])
    tables = {}
    for name in names:
        files = sorted((directory / manifest["scores_dir"] / name).glob(SHARD_GLOB))
        if not files:
            raise FileNotFoundError(f"{directory}: no scores for checkpoint {name!r}")
        t = read_scores(files)
        tables[name] = {(p, int(s)): i for i, (p, s) in enumerate(zip(t["prompt_id"].to_pylist(),
                                                                      t["sample_index"].to_pylist()))}, t  # fmt: skip
    key_sets = [set(index) for index, _ in tables.values()]
    common = sorted(set.intersection(*key_sets))
    complete = all(len(k) == len(common) for k in key_sets)
    first_index, first = tables[names[0]]
    rows0 = [first_index[k] for k in common]
    prompts = [first["prompt"][i].as_py() for i in rows0]
    scores = {r: np.zeros((len(names), len(common))) for r in rewards}
    thumbs, reasoning = [], []
    for c, name in enumerate(names):
        index, t = tables[name]
        rows = [index[k] for k in common]
        taken = t.take(pa.array(rows, type=pa.int64())) if rows else t.slice(0, 0)
        score_col = taken["scores"].to_pylist()
        for r in rewards:
            scores[r][c] = [s[r] for s in score_col]
        thumbs.append(taken["thumbnail"].to_pylist())
        reasoning.append(taken[REASONING].to_pylist())
    return EvalResults(
        directory=directory, checkpoints=names, paths={n: manifest["checkpoints"].get(n, n) for n in names},
        rewards=rewards, prompt_ids=[k[0] for k in common], sample_index=np.array([k[1] for k in common]),
        prompts=prompts, scores=scores, thumbnails=thumbs, complete=complete, reasoning=reasoning,
        self_cot=[n for n in names if n in manifest.get("self_cot", [])],
    )  # fmt: skip


def thumbnail_features(png: bytes, side: int = 32) -> np.ndarray:
    """PNG bytes -> [side*side*3] float in [0, 1] (a cheap image descriptor for diversity)."""
    img = Image.open(io.BytesIO(png)).convert("RGB").resize((side, side), Image.BILINEAR)
    return np.asarray(img, dtype=np.float64).reshape(-1) / 255.0


def prompt_groups(results: EvalResults, checkpoint: int) -> list[np.ndarray]:
    """Thumbnail features of one checkpoint grouped by prompt: a list of [G, D] arrays."""
    groups: dict[str, list[np.ndarray]] = {}
    for pid, png in zip(results.prompt_ids, results.thumbnails[checkpoint]):
        groups.setdefault(pid, []).append(thumbnail_features(png))
    return [np.stack(g) for g in groups.values()]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl rows ({'step', 'time', 'area/name': value}); [] when the run has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class PrefPairs:
    """A preference dataset's pairs (as many as were read)."""

    directory: Path
    rewards: list[str]  # [R]
    primary: str
    prompts: list[str]  # [M]
    chosen_scores: dict[str, np.ndarray]  # reward -> [M]
    rejected_scores: dict[str, np.ndarray]  # reward -> [M]
    chosen_images: list[bytes]  # [M] PNG
    rejected_images: list[bytes]  # [M] PNG


def is_prefs_dir(path: Path) -> bool:
    return (path / PREFS_MANIFEST).is_file() and (path / PREFS_DATA_DIR).is_dir()


def read_prefs(directory: str | Path, max_pairs: int = 2000) -> PrefPairs:
    """The first `max_pairs` pairs of a build-prefs dataset."""
    directory = Path(directory)
    manifest = json.loads((directory / PREFS_MANIFEST).read_text())
    cols = ["prompt", "chosen_image", "rejected_image", "chosen_scores", "rejected_scores"]
    tables, count = [], 0
    for f in sorted((directory / PREFS_DATA_DIR).glob(SHARD_GLOB)):
        if count >= max_pairs:
            break
        t = pq.read_table(f, columns=cols)
        tables.append(t.slice(0, max_pairs - count))
        count += tables[-1].num_rows
    t = pa.concat_tables(tables) if tables else None
    rewards = list(manifest["rewards"])

    def column(name: str) -> list:
        return t[name].to_pylist() if t is not None else []

    chosen, rejected = column("chosen_scores"), column("rejected_scores")
    return PrefPairs(
        directory=directory, rewards=rewards, primary=manifest.get("primary", rewards[0]), prompts=column("prompt"),
        chosen_scores={r: np.array([s[r] for s in chosen], dtype=np.float64) for r in rewards},
        rejected_scores={r: np.array([s[r] for s in rejected], dtype=np.float64) for r in rewards},
        chosen_images=column("chosen_image"), rejected_images=column("rejected_image"),
    )  # fmt: skip
