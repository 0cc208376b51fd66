"""Self-CoT in the dashboard: each thumbnail's reasoning (untrusted model output) reaches the page as JSON
text only, Self-CoT entries are named, the with-vs-without pair gets its paired CI, and score shards
written before the reasoning column existed still read."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dashboard.build import build_data
from dashboard.data import read_eval
from dashboard.page import render
from dashboard.stats import paired_delta_ci
from tests.dashboard.handmade import eval_dir, png

HOSTILE = "<!--<script></script>& <b>bold</b> \u2028"
PROMPTS = ["a red circle", "a blue square", "two stars"]


def _data_block(page: str) -> str:
    start = page.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return page[start : page.index("</script", start)]


def test_reasoning_rides_with_its_row_and_marks_the_entry(tmp_path):
    texts = ["1 circle: red, middle", HOSTILE, ""]
    res = read_eval(eval_dir(tmp_path, PROMPTS, reasoning=texts))
    assert res.self_cot == ["b"]
    assert res.reasoning == [[None, None, None], texts]  # a: sampled without Self-CoT
    section = build_data([tmp_path], num_resamples=50)["evals"][0]
    assert section["self_cot"] == ["b"]
    assert [row["reasoning"] for row in section["grid"]] == [[None, t] for t in texts]


def test_the_with_vs_without_pair_carries_its_paired_ci(tmp_path):
    section = build_data([eval_dir(tmp_path, PROMPTS, reasoning=["x"] * 3)], num_resamples=50)["evals"][0]
    [pair] = section["cot_pairs"]  # a and b are both `tiny`: the same weights, b with Self-CoT
    assert (pair["with"], pair["without"]) == ("b", "a")
    # jpeg(b) - jpeg(a) = 1 on every row: the gain and both ends of its interval are 1
    assert pair["deltas"]["jpeg"] == {"delta": 1.0, "lo": 1.0, "hi": 1.0}
    assert pair["deltas"]["jpeg"] == section["deltas"]["a"]["jpeg"][1]


def test_the_pair_ci_is_the_paired_bootstrap_of_the_rows(tmp_path):
    out = eval_dir(tmp_path, PROMPTS, reasoning=["x"] * 3)
    table = pq.read_table(out / "scores" / "b" / "shard-000000.parquet").to_pylist()
    for row, jpeg in zip(table, (0.0, 5.0, 1.0)):  # gains over a (0, 1, 2): 0, +4, -1
        row["scores"] = {"jpeg": jpeg, "composite": jpeg}
    pq.write_table(pa.Table.from_pylist(table), out / "scores" / "b" / "shard-000000.parquet")
    [pair] = build_data([out], num_resamples=200)["evals"][0]["cot_pairs"]
    delta, lo, hi = paired_delta_ci([0.0, 5.0, 1.0], [0.0, 1.0, 2.0], num_resamples=200, seed=0)
    assert delta == pytest.approx(1.0)  # (0 + 4 - 1) / 3
    assert pair["deltas"]["jpeg"] == {"delta": pytest.approx(delta), "lo": pytest.approx(lo), "hi": pytest.approx(hi)}


def test_hostile_reasoning_stays_inside_the_data_block(tmp_path):
    data = build_data([eval_dir(tmp_path, PROMPTS, reasoning=[HOSTILE] * 3)], num_resamples=50)
    page = render(data)
    block = _data_block(page)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    assert json.loads(block)["evals"][0]["grid"][0]["reasoning"] == [None, HOSTILE]
    assert page.count("</script>") == 2 and "<b>bold" not in page


def test_shards_from_before_the_reasoning_column_still_build(tmp_path):
    out = eval_dir(tmp_path / "eval", PROMPTS, old_format=True)
    assert "reasoning" not in pq.read_table(out / "scores" / "a" / "shard-000000.parquet").column_names
    res = read_eval(out)
    assert res.self_cot == [] and res.reasoning == [[None] * 3, [None] * 3]
    section = build_data([out], num_resamples=50)["evals"][0]
    assert section["cot_pairs"] == [] and section["grid"][0]["reasoning"] == [None, None]
    assert "Loading" in render(build_data([out], num_resamples=50))


def test_an_old_shard_and_a_new_one_of_one_checkpoint_read_together(tmp_path):
    """A directory resumed after the column was added: shard 0 without it, shard 1 with it."""
    from rollout.eval_format import rows_schema

    out = eval_dir(tmp_path, PROMPTS[:2], old_format=True)
    for name, text in (("a", None), ("b", "2 stars")):
        row = {"checkpoint": name, "prompt_id": f"{9:016x}", "prompt": "two stars", "sample_index": 0, "seed": 9,
               "scores": {"jpeg": 7.0, "composite": 7.0}, "thumbnail": png(np.random.default_rng(0)),
               "reasoning": text}  # fmt: skip
        pq.write_table(pa.Table.from_pylist([row], schema=rows_schema(["jpeg", "composite"])),
                       out / "scores" / name / "shard-000001.parquet")  # fmt: skip
    res = read_eval(out)
    assert res.prompts == ["a red circle", "a blue square", "two stars"] and res.complete
    assert res.reasoning == [[None, None, None], [None, None, "2 stars"]]
    assert res.scores["jpeg"][:, 2].tolist() == [7.0, 7.0]
