"""Result directories written by hand, for dashboard tests that need no model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(rng: np.random.Generator, side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def eval_dir(out: Path, prompts: list[str], reasoning: list[str] | None = None, old_format: bool = False) -> Path:
    """An `nsalign evaluate` output: checkpoints a and b, one seed per prompt, jpeg score = prompt index
    (+1 for b). reasoning: b is a Self-CoT entry that wrote reasoning[i] for prompt i (a is not);
    old_format: shards without the reasoning column and eval.json without `self_cot`, as written before it."""
    from rollout.eval_format import REASONING, rows_schema

    schema = rows_schema(["jpeg", "composite"])
    if old_format:
        schema = schema.remove(schema.get_field_index(REASONING))
    rng = np.random.default_rng(2)
    for c, name in enumerate(("a", "b")):
        rows = [{"checkpoint": name, "prompt_id": f"{i:016x}", "prompt": p, "sample_index": 0, "seed": i,
                 "scores": {"jpeg": float(i + c), "composite": float(i + c)}, "thumbnail": png(rng)}
                for i, p in enumerate(prompts)]  # fmt: skip
        if reasoning is not None and name == "b":
            rows = [{**row, REASONING: text} for row, text in zip(rows, reasoning)]
        (out / "scores" / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "scores" / name / "shard-000000.parquet")
    manifest = {"checkpoints": {"a": "tiny", "b": "tiny"}, "rewards": ["jpeg", "composite"], "scores_dir": "scores"}
    if not old_format:
        manifest["self_cot"] = ["b"] if reasoning is not None else []
    (out / "eval.json").write_text(json.dumps(manifest))
    return out
