"""The result format of `nsalign evaluate`, which `nsalign select` and the dashboard read.

    <out>/config.yaml                                the evaluation settings (a re-run must match them)
    <out>/scores/<checkpoint>/shard-000000.parquet   one file per (checkpoint, block of prompts), rows_schema
    <out>/eval.json                                  checkpoints (name -> path), prompts, rewards, sampler,
                                                     the entries sampled with Self-CoT and their `cot`

One row per image: checkpoint, prompt id and text, sample index, seed, every reward's score, a PNG
thumbnail and the sample's reasoning (`reasoning`: the text a Self-CoT entry wrote before the image; null
for an entry sampled without Self-CoT, and absent from shards written before the column existed: readers
take a missing column as all null). A shard is written atomically, so "the file exists" means "scored".
(dashboard/data.py reads these files through the names in core/formats.py, without importing torch.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from core.files import atomic_write
from core.formats import EVAL_MANIFEST, EVAL_SCORES_DIR
from rollout.batch import RolloutBatch

SCORES_DIR, MANIFEST = EVAL_SCORES_DIR, EVAL_MANIFEST  # core/formats.py names every result file once
REASONING = "reasoning"  # the column dashboard/data.py reads (by this name) beside each thumbnail


def thumbnail_png(image: torch.Tensor, size: int) -> bytes:
    """uint8 [3, H, W] -> PNG bytes of at most size x size pixels."""
    img = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if img.width > size or img.height > size:
        img = img.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rows_schema(reward_names: list[str]) -> pa.Schema:
    scores = pa.struct([(name, pa.float64()) for name in reward_names])
    return pa.schema([
        ("checkpoint", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
        ("sample_index", pa.int32()), ("seed", pa.int64()), ("scores", scores), ("thumbnail", pa.binary()),
        (REASONING, pa.string()),  # nullable: null without Self-CoT
    ])  # fmt: skip


def shard_rows(
    name: str, batch: RolloutBatch, scores: dict[str, np.ndarray], samples_per_prompt: int, size: int
) -> list[dict]:
    """One scored rollout batch -> rows (one per image); `reasoning` is batch.texts[i] (None without Self-CoT)."""
    texts = batch.texts if batch.texts is not None else [None] * len(batch)
    return [
        {"checkpoint": name, "prompt_id": batch.prompt_ids[i], "prompt": batch.prompts[i],
         "sample_index": i % samples_per_prompt, "seed": int(batch.seeds[i]),
         "scores": {n: float(s[i]) for n, s in scores.items()}, "thumbnail": thumbnail_png(batch.images[i], size),
         REASONING: texts[i]}
        for i in range(len(batch))
    ]  # fmt: skip


def write_rows(path: Path, rows: list[dict], reward_names: list[str]) -> None:
    """Atomically: a temporary file next to `path`, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=rows_schema(reward_names))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
