"""Prompt sources: .txt (one per line), .jsonl (`prompt` + metadata), .json (a list of objects),
.tsv (header with a `prompt` column), .parquet (a `prompt` column).

Every prompt gets a stable id (hash of its text), duplicates are dropped (first occurrence kept),
and `shard(i, n)` splits a source across workers deterministically. Problems in a file end with one
`UserError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from core.errors import ConfigError, UserError
from core.tables import first_line, read_columns


@dataclass
class PromptSourceConfig:
    path: str = "prompts/pickscore_train.txt"
    field: str = "prompt"  # jsonl / json / tsv / parquet column
    limit: int | None = 20000  # first `limit` unique prompts (None: all)

    def validate(self, where: str = "prompts") -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit: must be >= 1 or null (all prompts), got {self.limit}")


@dataclass(frozen=True)
class Prompt:
    id: str  # 16 hex chars of sha1(text): stable across files, runs and machines
    text: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def load_prompts(path: str | Path, field_name: str = "prompt", limit: int | None = None) -> list[Prompt]:
    """Read, validate and de-duplicate the prompts of one file (first `limit` unique ones)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise UserError(f"{path}: prompt limit must be >= 1 (None: all), got {limit}")
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".tsv": _read_tsv,
               ".parquet": _read_parquet}  # fmt: skip
    if suffix not in readers:
        raise UserError(f"{path}: unsupported prompt file type '{suffix}' (use {', '.join(readers)})")
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for line_no, text, meta in readers[suffix](path, field_name):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{line_no}: empty prompt")
        text = text.strip()
        pid = prompt_id(text)
        if pid in seen:
            continue
        seen.add(pid)
        prompts.append(Prompt(pid, text, meta))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{path}: no prompts (empty file)")
    return prompts


def shard(prompts: list[Prompt], index: int, count: int) -> list[Prompt]:
    """Worker `index` of `count` takes every count-th prompt (order kept, shards disjoint and complete)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} not in [0, {count})")
    return prompts[index::count]


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}:{line_no}: not valid UTF-8") from None


def _lines(path: Path):
    """(line number, text) for every line, the final newline not making an extra empty line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            yield line_no, _decode(raw, path, line_no).rstrip("\r\n")


def _read_txt(path: Path, field_name: str):
    for line_no, text in _lines(path):
        yield line_no, text, {}


def _read_jsonl(path: Path, field_name: str):
    for line_no, text in _lines(path):
        if not text.strip():
            raise UserError(f"{path}:{line_no}: empty line")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        yield line_no, *_split_record(obj, field_name, path, line_no)


def _read_json(path: Path, field_name: str):
    try:
        data = json.loads(_decode(path.read_bytes(), path, 1))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects with a '{field_name}' field")
    for i, obj in enumerate(data, start=1):
        yield i, *_split_record(obj, field_name, path, i)


def _read_tsv(path: Path, field_name: str):
    rows = (text for _, text in _lines(path))
    reader = csv.DictReader(rows, delimiter="\t", quoting=csv.QUOTE_NONE)
    if reader.fieldnames is None:
        raise UserError(f"{path}: no prompts (empty file)")
    if field_name not in reader.fieldnames:
        raise UserError(f"{path}:1: header has no '{field_name}' column (columns: {', '.join(reader.fieldnames)})")
    for i, row in enumerate(reader, start=2):
        yield i, *_split_record(row, field_name, path, i)


def _read_parquet(path: Path, field_name: str):
    read_columns(path, {field_name: "string"}, "prompt file")  # one line naming a bad file or column
    try:
        table = pq.read_table(path)  # all columns: the others become each prompt's metadata
    except Exception as e:  # pyarrow: a corrupt page behind a readable schema
        raise UserError(f"{path}: corrupt prompt file ({first_line(e)})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, *_split_record(row, field_name, path, i)


def _split_record(obj, field_name: str, path: Path, line_no: int) -> tuple[str, dict]:
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{line_no}: expected an object with a '{field_name}' field")
    if field_name not in obj or obj[field_name] is None:
        raise UserError(f"{path}:{line_no}: missing field '{field_name}'")
    meta = {k: v for k, v in obj.items() if k != field_name}
    return obj[field_name], meta
