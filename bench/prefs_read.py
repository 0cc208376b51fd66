"""Preference-token read benchmark: `read_pairs` before (Python lists) and now (Arrow value buffers).

Writes a synthetic build-prefs dataset (random fp32 tokens [T, 64] per image, the pairs schema, shards
of 50 pairs in row groups of 16) for each token count, then reads it back in a fresh process per method
and reports the wall time and peak resident memory of the read, and the ratio old / new. `old` is the
list path read_pairs took before (kept below as the reference); `new` is rollout.prefs_format.read_pairs.

  python bench/prefs_read.py [--pairs 200] [--tokens 1024 4096] [--out bench/results/prefs_read_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

DIM, PAIRS_PER_SHARD, ROW_GROUP = 64, 50, 16


def token_column(rows: int, tokens: int, seed: int):
    """A list<list<float32>> column of `rows` random [tokens, DIM] arrays, built without Python lists."""
    import numpy as np
    import pyarrow as pa

    values = pa.array(np.random.default_rng(seed).standard_normal(rows * tokens * DIM, dtype=np.float32))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * tokens + 1, dtype=np.int32) * DIM), values)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows + 1, dtype=np.int32) * tokens), inner)


def write_dataset(root: Path, pairs: int, tokens: int) -> None:
    """`pairs` rows in the pairs schema under root/data (images empty, one reward 'jpeg')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rollout.prefs_format import DATA_DIR, pairs_schema

    schema = pairs_schema(["jpeg"])
    (root / DATA_DIR).mkdir(parents=True)
    for k, start in enumerate(range(0, pairs, PAIRS_PER_SHARD)):
        n = min(PAIRS_PER_SHARD, pairs - start)
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        columns.update(
            prompt=pa.array([f"prompt {start + i}" for i in range(n)]),
            chosen_tokens=token_column(n, tokens, 2 * k), rejected_tokens=token_column(n, tokens, 2 * k + 1),
            chosen_reward=pa.array([1.0] * n), rejected_reward=pa.array([0.0] * n),
            sampling=pa.array([json.dumps({"image_size": 512})] * n),
        )  # fmt: skip
        table = pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)
        pq.write_table(table, root / DATA_DIR / f"shard-{k:06d}.parquet", row_group_size=ROW_GROUP)


def read_pairs_old(directory: Path) -> tuple:
    """What read_pairs did before: every token through a Python list, then torch.tensor."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    paths = sorted((directory / "data").glob("shard-*.parquet"))
    names = ["prompt", "chosen_tokens", "rejected_tokens", "chosen_reward", "rejected_reward", "sampling"]
    table = pa.concat_tables([pq.read_table(p, columns=names) for p in paths])
    sizes = {json.loads(s)["image_size"] for s in table.column("sampling").to_pylist()}
    chosen = torch.tensor(table.column("chosen_tokens").to_pylist(), dtype=torch.float32)
    rejected = torch.tensor(table.column("rejected_tokens").to_pylist(), dtype=torch.float32)
    return table.column("prompt").to_pylist(), chosen, rejected, sizes


def read_once(method: str, directory: Path) -> dict:
    """Time one read in this process; peak RSS of the process (it did nothing else)."""
    import pyarrow.parquet as pq
    import torch

    from rollout.prefs_format import read_pairs

    torch.set_num_threads(1)
    pq.read_table(next((directory / "data").glob("*.parquet")), columns=["prompt"])  # pyarrow's lazy imports
    start = time.perf_counter()
    if method == "old":
        _, chosen, rejected, _ = read_pairs_old(directory)
    else:
        pairs = read_pairs(directory)
        chosen, rejected = pairs.chosen_tokens, pairs.rejected_tokens
    seconds = time.perf_counter() - start
    checksum = float(chosen.double().sum() + rejected.double().sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "shape": list(chosen.shape), "checksum": checksum}


def measure(method: str, directory: Path) -> dict:
    """read_once in a fresh interpreter (this script with --one), so peak memory is the read's own."""
    argv = [sys.executable, __file__, "--one", method, str(directory)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_seconds(pairs: int, tokens: int) -> tuple[float, float]:
    """Seconds to turn `pairs` rows into a shard table: tokens as Python lists (`.tolist()` then Arrow's row
    conversion, build-prefs before) vs `pairs_table` over one flat buffer (now); the two tables must agree."""
    import pyarrow as pa
    import torch

    from rollout.prefs_format import pairs_schema, pairs_table

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt_id": f"p{i}", "prompt": "x", "pair_index": 0, "chosen_image": b"", "rejected_image": b"",
             "chosen_tokens": torch.randn(tokens, DIM, generator=g),
             "rejected_tokens": torch.randn(tokens, DIM, generator=g),
             "chosen_scores": {"r": 1.0}, "rejected_scores": {"r": 0.0}, "chosen_reward": 1.0, "rejected_reward": 0.0,
             "chosen_seed": i, "rejected_seed": i, "chosen_sample_index": 0, "rejected_sample_index": 1,
             "strategy": "s", "sampling": "{}", "checkpoint": "c", "policy_version": 0}
            for i in range(pairs)]  # fmt: skip
    start = time.perf_counter()
    as_lists = [{**r, "chosen_tokens": r["chosen_tokens"].tolist(), "rejected_tokens": r["rejected_tokens"].tolist()}
                for r in rows]  # fmt: skip
    old_table = pa.Table.from_pylist(as_lists, schema=pairs_schema(["r"]))
    old = time.perf_counter() - start
    start = time.perf_counter()
    new_table = pairs_table([{**r, "chosen_tokens": r["chosen_tokens"].numpy(),
                              "rejected_tokens": r["rejected_tokens"].numpy()} for r in rows], ["r"])  # fmt: skip
    new = time.perf_counter() - start
    assert new_table.equals(old_table)
    return old, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])  # 512^2 and 1024^2 images
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)  # a child's read
    args = parser.parse_args()
    if args.one:
        print(json.dumps(read_once(args.one[0], Path(args.one[1]))))
        return
    from dashboard.markdown import markdown_table

    rows = []
    for tokens in args.tokens:
        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(Path(tmp), args.pairs, tokens)
            mb = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet")) / 2**20
            old, new = measure("old", Path(tmp)), measure("new", Path(tmp))
        assert old["shape"] == new["shape"] and old["checksum"] == new["checksum"], (old, new)  # same tensors
        ratio = old["seconds"] / new["seconds"]
        rows.append([f"{args.pairs} x {tokens} x {DIM}", f"{mb:.0f}", f"{old['seconds']:.2f}", f"{new['seconds']:.3f}",
                     f"{ratio:.0f}x", f"{old['peak_mb']:.0f}", f"{new['peak_mb']:.0f}"])  # fmt: skip
    table = markdown_table(["pairs x tokens x dim", "Parquet MB", "old s", "new s", "old / new", "old peak MB",
                            "new peak MB"], rows)  # fmt: skip
    writes = []
    for tokens in args.tokens:
        old, new = write_seconds(args.pairs, tokens)
        writes.append([f"{args.pairs} x {tokens} x {DIM}", f"{old:.2f}", f"{new:.3f}", f"{old / new:.0f}x"])
    write_table = markdown_table(["pairs x tokens x dim", "lists s", "flat buffer s", "lists / flat"], writes)
    print(table)
    print(f"\nbuild-prefs shard table (write side):\n{write_table}")
    if args.out:
        args.out.write_text(
            f"# read_pairs: list path vs Arrow buffers (CPU)\n\n{table}\n\n"
            f"## build-prefs shard table: Python lists vs one flat buffer\n\n{write_table}\n"
        )


if __name__ == "__main__":
    main()
