"""Prompt sources and their errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import UserError
from rollout.prompts import load_prompts, prompt_id, shard

PROMPTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "prompts"  # shipped in the repository


def test_txt_dedup_and_stable_ids(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\na dog\na cat\n  a bird  \n")
    ps = load_prompts(f)
    assert [p.text for p in ps] == ["a cat", "a dog", "a bird"]
    assert ps[0].id == prompt_id("a cat") == load_prompts(f)[0].id and len(ps[0].id) == 16


def test_jsonl_keeps_metadata_and_tsv_parquet_json(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(
        json.dumps({"prompt": "two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]}) + "\n"
    )
    p = load_prompts(j)[0]
    assert p.text == "two cats" and p.metadata["include"][0]["count"] == 2
    t = tmp_path / "p.tsv"
    t.write_text("id\tprompt\n1\ta red car\n2\ta blue car\n")
    assert [p.text for p in load_prompts(t)] == ["a red car", "a blue car"]
    pq.write_table(pa.table({"prompt": ["x", "y"], "score": [1, 2]}), tmp_path / "p.parquet")
    assert [p.metadata["score"] for p in load_prompts(tmp_path / "p.parquet")] == [1, 2]
    (tmp_path / "p.json").write_text(json.dumps([{"id": "a", "prompt": "z"}]))
    assert load_prompts(tmp_path / "p.json")[0].text == "z"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "no prompts"),
        ("blank.txt", b"a\n\nb\n", "blank.txt:2: empty prompt"),
        ("latin.txt", b"ok\ncaf\xe9\n", "latin.txt:2: not valid UTF-8"),
        ("nofield.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', "nofield.jsonl:2: missing field 'prompt'"),
        ("bad.jsonl", b'{"prompt": "a"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        ("nocol.tsv", b"id\ttext\n1\ta\n", "nocol.tsv:1: header has no 'prompt' column"),
        ("x.csv", b"prompt\na\n", "unsupported prompt file type"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_prompts(f)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "nope.txt")


def test_shards_are_disjoint_and_complete(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(10)))
    ps = load_prompts(f)
    parts = [shard(ps, i, 3) for i in range(3)]
    assert sorted(p.id for part in parts for p in part) == sorted(p.id for p in ps)
    assert sum(len(p) for p in parts) == 10


def test_shipped_prompt_sets_load():
    assert len(load_prompts(PROMPTS / "pickscore_train.txt", limit=20000)) == 20000
    gen = load_prompts(PROMPTS / "geneval_metadata.jsonl")
    assert len(gen) == 553 and "include" in gen[0].metadata
    assert len(load_prompts(PROMPTS / "imagereward_benchmark.json")) == 100
    assert len(load_prompts(PROMPTS / "ocr_test.txt")) > 1000
