"""read_pairs reads token columns through Arrow's value buffers, not Python lists: the same tensors as the
old list path (kept here as the reference), shards and row groups stitched in order, any list layout of
numbers accepted, ragged or null rows refused in one line naming the shard."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.errors import UserError
from rollout.prefs_format import DATA_DIR, id_column, pairs_schema, pairs_table, read_pairs, token_block, token_column

T, D = 6, 4  # tokens per image, dims per token (64 in the real model)


def pair_rows(n: int, seed: int, self_cot: bool = False) -> dict[str, list]:
    """Columns of `n` pair rows in the build-prefs schema, tokens random fp32 [T, D] per image."""
    g = np.random.default_rng(seed)
    tokens = lambda: g.standard_normal((T, D)).astype(np.float32).tolist()  # noqa: E731
    rewards = g.random((n, 2)).astype(np.float32)
    return {
        "prompt_id": [f"p{seed}-{i}" for i in range(n)], "prompt": [f"prompt {seed}-{i}" for i in range(n)],
        "pair_index": [0] * n, "chosen_image": [b""] * n, "rejected_image": [b""] * n,
        "chosen_tokens": [tokens() for _ in range(n)], "rejected_tokens": [tokens() for _ in range(n)],
        "chosen_scores": [{"jpeg": float(r)} for r in rewards[:, 0]],
        "rejected_scores": [{"jpeg": float(r)} for r in rewards[:, 1]],
        "chosen_reward": rewards[:, 0].tolist(), "rejected_reward": rewards[:, 1].tolist(),
        "chosen_seed": list(range(n)), "rejected_seed": list(range(n)), "chosen_sample_index": [0] * n,
        "rejected_sample_index": [1] * n, "strategy": ["best_vs_worst"] * n,
        "sampling": [json.dumps({"image_size": 32})] * n, "checkpoint": ["tiny"] * n, "policy_version": [0] * n,
    } | (text_rows(n, seed) if self_cot else {})  # fmt: skip


def text_rows(n: int, seed: int) -> dict[str, list]:
    """The Self-CoT columns of `n` rows: ragged ids (row i has i % 3 of them), as their sampler settings say."""
    ids = [[seed * 100 + i * 10 + k for k in range(i % 3)] for i in range(n)]
    return {
        "chosen_text": [f"plan {r}" for r in ids], "rejected_text": [f"other {r}" for r in ids],
        "chosen_text_ids": ids, "rejected_text_ids": [r[::-1] for r in ids],
        "chosen_text_stopped": [i % 2 == 0 for i in range(n)], "rejected_text_stopped": [False] * n,
        "sampling": [json.dumps({"image_size": 32, "self_cot": True, "cot": {"template": "{caption}:"}})] * n,
    }  # fmt: skip


def write_shards(root, sizes: list[int], row_group: int = 2, self_cot: bool = False) -> None:
    """Shards of `sizes` rows each under root/data, in row groups of `row_group` rows."""
    (root / DATA_DIR).mkdir(parents=True)
    for k, n in enumerate(sizes):
        table = pa.table(pair_rows(n, seed=k, self_cot=self_cot), schema=pairs_schema(["jpeg"], self_cot))
        pq.write_table(table, root / DATA_DIR / f"shard-{k:06d}.parquet", row_group_size=row_group)


def old_tokens(root, name: str) -> torch.Tensor:
    """The reference: the list path read_pairs took before (Python lists, then torch.tensor)."""
    rows = [r for p in sorted((root / DATA_DIR).glob("*.parquet")) for r in pq.read_table(p).column(name).to_pylist()]
    return torch.tensor(rows, dtype=torch.float32)


def test_read_pairs_matches_the_list_path_over_shards_and_row_groups(tmp_path):
    write_shards(tmp_path, [0, 5, 3])  # an empty shard, then row groups of 2: chunks of 2, 2, 1 and 2, 1 rows
    pairs = read_pairs(tmp_path)
    assert pairs.chosen_tokens.shape == (8, T, D) and pairs.chosen_tokens.dtype == torch.float32
    assert torch.equal(pairs.chosen_tokens, old_tokens(tmp_path, "chosen_tokens"))
    assert torch.equal(pairs.rejected_tokens, old_tokens(tmp_path, "rejected_tokens"))
    assert not torch.equal(pairs.chosen_tokens, pairs.rejected_tokens)
    rewards = [r for k, n in enumerate([0, 5, 3]) for r in pair_rows(n, seed=k)["chosen_reward"]]
    assert pairs.chosen_reward.tolist() == rewards and pairs.prompts[5] == "prompt 2-0" and pairs.image_size == 32
    pairs.chosen_tokens[0, 0, 0] = 7.0  # the result owns its memory: writable, no Arrow buffer behind it
    assert not pairs.self_cot and pairs.cot is None  # an image-only dataset: no text fields
    assert pairs.chosen_text is None and pairs.chosen_text_ids is None and pairs.rejected_text_stopped is None


def test_self_cot_columns_read_back_over_shards_and_row_groups(tmp_path):
    write_shards(tmp_path, [0, 5, 3], self_cot=True)  # ids of 0, 1, 2, 0, 1 and 0, 1, 2 tokens
    pairs = read_pairs(tmp_path)
    assert pairs.self_cot and pairs.cot.template == "{caption}:" and pairs.cot.max_text_tokens == 256
    assert pairs.chosen_text_ids == [[], [110], [120, 121], [], [140], [], [210], [220, 221]]
    assert pairs.rejected_text_ids[2] == [121, 120] and pairs.chosen_text[1] == "plan [110]"
    assert pairs.chosen_text_stopped.tolist() == [True, False, True, False, True, True, False, True]
    assert pairs.rejected_text_stopped.dtype == torch.bool and not pairs.rejected_text_stopped.any()


def test_token_block_views_arrow_values_and_honours_slices():
    values = pa.array(np.arange(1, 13, dtype=np.float32))  # 1..12
    column = pa.ListArray.from_arrays([0, 2, 4, 6], pa.ListArray.from_arrays(list(range(0, 13, 2)), values))
    block = token_block(column)  # [3 rows, 2 tokens, 2 dims]
    assert block.tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]
    assert block.__array_interface__["data"][0] == values.buffers()[1].address  # a view, not a copy
    assert token_block(column.slice(1, 2)).tolist() == [[[5, 6], [7, 8]], [[9, 10], [11, 12]]]


@pytest.mark.parametrize(
    "dtype",
    [pa.list_(pa.list_(pa.float64(), D), T), pa.large_list(pa.list_(pa.float16())), pa.list_(pa.list_(pa.int32()))],
)
def test_other_list_layouts_read_the_same_as_the_list_path(tmp_path, dtype):
    g = np.random.default_rng(3)
    tokens = [(g.standard_normal((T, D)) * 100).round().tolist() for _ in range(3)]  # whole numbers: int32 holds them
    (tmp_path / DATA_DIR).mkdir(parents=True)
    table = pa.table({"prompt": ["a", "b", "c"], "chosen_tokens": pa.array(tokens, dtype),
                      "rejected_tokens": pa.array(tokens, dtype), "chosen_reward": [1, 2, 3],
                      "rejected_reward": [0, 0, 0], "sampling": ['{"image_size": 64}'] * 3})  # fmt: skip
    pq.write_table(table, tmp_path / DATA_DIR / "shard-000000.parquet")
    pairs = read_pairs(tmp_path)
    assert torch.equal(pairs.chosen_tokens, old_tokens(tmp_path, "chosen_tokens"))
    assert pairs.chosen_tokens.shape == (3, T, D) and pairs.chosen_reward.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("bad", ["ragged tokens", "ragged dims", "null row", "null number", "flat", "other T"])
def test_irregular_token_columns_fail_in_one_line_naming_the_shard(tmp_path, bad):
    write_shards(tmp_path, [2, 2])
    shard = tmp_path / DATA_DIR / "shard-000001.parquet"
    table = pq.read_table(shard)
    rows = table.column("rejected_tokens").to_pylist()
    if bad == "ragged tokens":
        rows[1] = rows[1][:-1]
    elif bad == "ragged dims":
        rows[1][2] = rows[1][2][:-1]
    elif bad == "null row":
        rows[0] = None
    elif bad == "null number":
        rows[1][0][0] = None
    elif bad == "other T":  # a regular shard, but of another token count than shard 0
        rows = [r[:-1] for r in rows]
    column = (
        pa.array([r[0] for r in rows]) if bad == "flat" else pa.array(rows, table.schema.field("rejected_tokens").type)
    )
    pq.write_table(table.set_column(table.schema.get_field_index("rejected_tokens"), "rejected_tokens", column), shard)
    with pytest.raises(UserError) as error:
        read_pairs(tmp_path)
    assert str(error.value) == f"{shard}: column 'rejected_tokens' is not a [pairs, tokens, dims] array of numbers"


def test_the_writer_builds_the_same_table_as_the_row_conversion() -> None:
    """pairs_table (tokens from one flat buffer) equals Arrow's own row-by-row conversion of the same rows,
    with tokens given as arrays or as tensors; no rows gives the empty table of the schema."""
    columns = pair_rows(3, seed=7)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(3)]
    expected = pa.Table.from_pylist(rows, schema=pairs_schema(["jpeg"]))
    as_arrays = [{**r, "chosen_tokens": np.asarray(r["chosen_tokens"], dtype=np.float32),
                  "rejected_tokens": torch.tensor(r["rejected_tokens"])} for r in rows]  # fmt: skip
    assert pairs_table(as_arrays, ["jpeg"]).equals(expected)
    assert pairs_table([], ["jpeg"]).equals(pairs_schema(["jpeg"]).empty_table())
    block = token_column([np.arange(6, dtype=np.float32).reshape(3, 2)])  # one row: [[0, 1], [2, 3], [4, 5]]
    assert block.to_pylist() == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]]


def test_the_writer_builds_self_cot_columns_like_the_row_conversion() -> None:
    """Text ids as int64 arrays, tensors or lists go through one flat int32 buffer and equal Arrow's own rows."""
    columns = pair_rows(4, seed=1, self_cot=True)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(4)]
    expected = pa.Table.from_pylist(rows, schema=pairs_schema(["jpeg"], self_cot=True))
    mixed = [{**r, "chosen_text_ids": np.asarray(r["chosen_text_ids"], dtype=np.int64),
              "rejected_text_ids": torch.tensor(r["rejected_text_ids"], dtype=torch.long)} for r in rows]  # fmt: skip
    assert pairs_table(mixed, ["jpeg"], self_cot=True).equals(expected)
    assert pairs_table([], ["jpeg"], self_cot=True).equals(pairs_schema(["jpeg"], self_cot=True).empty_table())
    column = id_column([np.array([5, 6]), np.array([], dtype=np.int64), np.array([7])])
    assert column.type == pa.list_(pa.int32()) and column.to_pylist() == [[5, 6], [], [7]]
    assert pairs_schema(["jpeg"]).names == pairs_schema(["jpeg"], self_cot=True).names[:19]  # text columns last


@pytest.mark.parametrize("bad", ["float ids", "null id", "null row", "stopped as int"])
def test_irregular_text_columns_fail_in_one_line_naming_the_dataset(tmp_path, bad):
    write_shards(tmp_path, [2, 3], self_cot=True)
    shard = tmp_path / DATA_DIR / "shard-000001.parquet"
    table = pq.read_table(shard)
    name = "chosen_text_stopped" if bad == "stopped as int" else "chosen_text_ids"
    rows = table.column(name).to_pylist()  # ids [[], [110], [120, 121]]
    column = {
        "float ids": lambda: pa.array(rows, pa.list_(pa.float32())),
        "null id": lambda: pa.array([[], [None], [120, 121]], pa.list_(pa.int32())),
        "null row": lambda: pa.array([[], None, [120, 121]], pa.list_(pa.int32())),
        "stopped as int": lambda: pa.array([int(r) for r in rows], pa.int8()),
    }[bad]()
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, column), shard)
    with pytest.raises(UserError) as error:
        read_pairs(tmp_path)
    expected = {
        "float ids": f"{shard}: column 'chosen_text_ids' is list<element: float>, but shard-000000.parquet has "
                     "list<element: int32>",
        "null id": f"{tmp_path}: column 'chosen_text_ids' is not a list of token ids per row",
        "null row": f"{tmp_path}: column 'chosen_text_ids' has 1 empty rows",
        "stopped as int": f"{shard}: column 'chosen_text_stopped' is int8, but shard-000000.parquet has bool",
    }[bad]  # fmt: skip
    assert str(error.value) == expected
