"""Why a method wins or loses on the shapes world: what its evaluated images actually contain.

    python bench/e2e_diagnose.py [--eval runs/e2e/eval] [--metadata runs/shapes/world/data/metadata.jsonl]
                                 [--out bench/results/e2e_diagnosis.md]

(`bench/e2e.py` runs it after the proof.)
Reads an `nsalign evaluate` directory of the shapes world (its kept thumbnails must be full size, 64 px)
and prints, per checkpoint, from the exact detector:
- objects drawn minus objects named (<= -1 / 0 / +1 / >= +2): extra objects are how GenEval's partial
  credit gets gamed, missing ones how a reward that punishes extras gets gamed;
- per named object: a component of its colour exists / one of its colour and shape exists / when its colour
  is one component, that component has the named shape (colour-shape binding; ~1/3 by chance);
- the shaped scene reward (`rewards/shapes_scene.py`, training-only) and GenEval's strict and partial means.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.markdown import markdown_table  # noqa: E402
from rewards.geneval import read_metadata  # noqa: E402
from rewards.shapes_detect import ShapesDetector  # noqa: E402
from rewards.shapes_scene import scene_credit  # noqa: E402
from rollout.prefs_format import decode_png  # noqa: E402


def diagnose(rows: list[dict], table: dict, detector: ShapesDetector) -> dict[str, float]:
    """Shares over one checkpoint's images (object-count offsets) and named objects (colour / shape hits)."""
    offsets, hits, named_total = collections.Counter(), collections.Counter(), 0
    shaped = []
    for r in rows:
        clauses, found = table[r["prompt"]], detector(decode_png(r["thumbnail"]))
        named = sum(req.count for req in clauses.include)
        offsets[min(2, max(-1, len(found) - named))] += 1
        for req in clauses.include:
            named_total += 1
            coloured = [d for d in found if req.color is None or d.color == req.color]
            hits["colour"] += bool(coloured)
            hits["colour+shape"] += any(d.label == req.label for d in coloured)
            if req.color is not None and len(coloured) == 1:  # binding: does its one object have the named shape?
                hits["sole"] += 1
                hits["sole+shape"] += coloured[0].label == req.label
        shaped.append(scene_credit(clauses, found)["reward"])
    n = len(rows)
    return {
        "<= -1": offsets[-1] / n, "0": offsets[0] / n, "+1": offsets[1] / n, ">= +2": offsets[2] / n,
        "colour": hits["colour"] / named_total, "colour+shape": hits["colour+shape"] / named_total,
        "binding": hits["sole+shape"] / max(hits["sole"], 1),
        "shaped": float(np.mean(shaped)),
        "strict": float(np.mean([r["scores"]["strict"] for r in rows])),
        "partial": float(np.mean([r["scores"]["partial"] for r in rows])),
    }  # fmt: skip


def diagnosis_table(eval_dir: str | Path, metadata: str | Path) -> str:
    """The markdown table of every checkpoint in an evaluation directory (see the module docstring)."""
    files = sorted(Path(eval_dir).glob("scores/*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no scores under {eval_dir}/scores (run the evaluation first)")
    by_checkpoint: dict[str, list[dict]] = {}
    for r in pa.concat_tables([pq.read_table(f) for f in files]).to_pylist():
        by_checkpoint.setdefault(r["checkpoint"], []).append(r)
    table, detector = read_metadata(metadata), ShapesDetector()
    header = ["checkpoint", "images", "objects drawn - named: <= -1", "0", "+1", ">= +2",
              "named object: colour found", "colour + shape found", "shape given colour", "shaped reward", "strict",
              "partial"]  # fmt: skip
    rows = [[name, len(rs)] + [f"{v:.3f}" for v in diagnose(rs, table, detector).values()]
            for name, rs in sorted(by_checkpoint.items(), key=lambda kv: (kv[0] != "pretrained", kv[0]))]  # fmt: skip
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", default="runs/e2e/eval", help="an `nsalign evaluate` output directory")
    p.add_argument("--metadata", default="runs/shapes/world/data/metadata.jsonl")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e_diagnosis.md"))
    args = p.parse_args(argv)
    try:
        table = diagnosis_table(args.eval, args.metadata)
    except FileNotFoundError as e:
        print(f"e2e_diagnose: {e}", file=sys.stderr)
        return 2
    text = "\n".join([
        "# What the evaluated images contain (shapes world)", "",
        f"`python bench/e2e_diagnose.py --eval {args.eval}`: the exact detector on every kept image.", "",
        table, "",
        "Objects drawn - named: share of images with that many more (or fewer) coloured components than the "
        "prompt names. Named object: share of the prompt's objects for which a component of its colour (and "
        "shape) exists. Shape given colour: for named objects whose colour appears as exactly one component, the "
        "share drawn in the named shape (binding of colour to shape; about 1/3 by chance). Shaped reward: "
        "`rewards/shapes_scene.py` (training-only), for comparison.", "",
    ])  # fmt: skip
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
