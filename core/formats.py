"""The names of the result files that one package writes and another reads, defined once.

    eval dir     eval.json + scores/<checkpoint>/shard-*.parquet   written by rollout.evaluation
    prefs dir    manifest.json + data/shard-*.parquet              written by jobs.build_prefs

The dashboard reads both without importing torch, so this module imports nothing (the architecture test
checks that, and that it is the one module of `core` the dashboard may import).
"""

SHARD_GLOB = "shard-*.parquet"

EVAL_MANIFEST = "eval.json"
EVAL_SCORES_DIR = "scores"

PREFS_MANIFEST = "manifest.json"
PREFS_DATA_DIR = "data"


def shard_name(index: int) -> str:
    """The file name of shard `index` in either directory."""
    return f"shard-{index:06d}.parquet"
