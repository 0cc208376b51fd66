"""The preference-dataset format `nsalign build-prefs` writes and `nsalign dpo` reads.

    <out>/config.yaml                    the resolved build config (a resume must match it)
    <out>/data/shard-000000.parquet      rows of pairs; one shard per block of `prompts_per_shard`
                                         prompts, written atomically (a shard file exists = done)
    <out>/manifest.json                  counts, reward names, sampler settings, checkpoint, shards

Every row is one pair: the prompt, both images as PNG bytes, both images' tokens (what the DPO
learner trains on), every reward's score for both, both seeds and sample indices, and the provenance
(sampler settings as JSON, the generating checkpoint, policy version, pair strategy).
A Self-CoT dataset (built with `sampling.self_cot`) has six more columns, each image's reasoning as the
sampler wrote it: `chosen_text`/`rejected_text` (string), `chosen_text_ids`/`rejected_text_ids`
(list<int32>) and `chosen_text_stopped`/`rejected_text_stopped` (bool); the template it was written with is
`cot` inside the `sampling` JSON. Image-only datasets (and shards written before Self-CoT) lack them.
`datasets.load_dataset("parquet", data_files=f"{out}/data/*.parquet")` reads it as it is.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from base_model.text import CotConfig
from core.errors import UserError
from core.formats import PREFS_DATA_DIR, PREFS_MANIFEST, SHARD_GLOB
from core.tables import concat_same_schema, read_columns

DATA_DIR, MANIFEST = PREFS_DATA_DIR, PREFS_MANIFEST  # core/formats.py names every result file once
TOKEN_COLUMNS = ("chosen_tokens", "rejected_tokens")  # [T][D] numbers per row, read without Python lists
TEXT_ID_COLUMNS = ("chosen_text_ids", "rejected_text_ids")  # [n] token ids per row, n varies
TEXT_FIELDS = {  # the Self-CoT columns -> their Arrow types
    "chosen_text": pa.string(), "rejected_text": pa.string(),
    "chosen_text_ids": pa.list_(pa.int32()), "rejected_text_ids": pa.list_(pa.int32()),
    "chosen_text_stopped": pa.bool_(), "rejected_text_stopped": pa.bool_(),
}  # fmt: skip
READ_THREADS = min(8, os.cpu_count() or 1)  # shards decoded at once by read_pairs


def pairs_schema(reward_names: list[str], self_cot: bool = False) -> pa.Schema:
    """Arrow schema of a pair row; scores are structs {reward name: float}; self_cot adds TEXT_FIELDS."""
    scores = pa.struct([(name, pa.float32()) for name in reward_names])
    tokens = pa.list_(pa.list_(pa.float32()))  # [T][64]
    text = list(TEXT_FIELDS.items()) if self_cot else []
    return pa.schema([
        ("prompt_id", pa.string()), ("prompt", pa.string()), ("pair_index", pa.int32()),
        ("chosen_image", pa.binary()), ("rejected_image", pa.binary()),
        ("chosen_tokens", tokens), ("rejected_tokens", tokens),
        ("chosen_scores", scores), ("rejected_scores", scores),
        ("chosen_reward", pa.float32()), ("rejected_reward", pa.float32()),  # the primary reward
        ("chosen_seed", pa.int64()), ("rejected_seed", pa.int64()),
        ("chosen_sample_index", pa.int32()), ("rejected_sample_index", pa.int32()),
        ("strategy", pa.string()), ("sampling", pa.string()), ("checkpoint", pa.string()),
        ("policy_version", pa.int64()),
        *text,
    ])  # fmt: skip


def token_column(blocks: list[np.ndarray]) -> pa.ListArray:
    """[T, D] float arrays, one per row (all the same shape) -> the [T][D] list column of `pairs_schema`,
    built over one flat float32 buffer (no Python list per number; the writer's half of `token_block`)."""
    if not blocks:
        return pa.array([], type=pa.list_(pa.list_(pa.float32())))
    stacked = np.ascontiguousarray(np.stack(blocks), dtype=np.float32)  # [N, T, D]
    n, t, d = stacked.shape
    inner = pa.ListArray.from_arrays(np.arange(0, n * t * d + 1, d, dtype=np.int32), pa.array(stacked.reshape(-1)))
    return pa.ListArray.from_arrays(np.arange(0, n * t + 1, t, dtype=np.int32), inner)


def id_column(rows: list) -> pa.ListArray:
    """Token ids [n_i] per row (integer arrays, tensors or lists) -> a list<int32> column over one flat
    int32 buffer (no Python object per id)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)  # [rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # [rows + 1]
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.int32()))


def pairs_table(rows: list[dict], reward_names: list[str], self_cot: bool = False) -> pa.Table:
    """Rows (tokens as [T, D] arrays or tensors, text ids as [n] integer arrays or lists) -> a table of
    `pairs_schema`; token and id columns go through `token_column`/`id_column`, the rest through Arrow's
    row conversion."""
    schema = pairs_schema(reward_names, self_cot)
    built = TOKEN_COLUMNS + (TEXT_ID_COLUMNS if self_cot else ())
    columns = {f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in schema if f.name not in built}
    for name in TOKEN_COLUMNS:
        columns[name] = token_column([np.asarray(r[name], dtype=np.float32) for r in rows])
    for name in TEXT_ID_COLUMNS if self_cot else ():
        columns[name] = id_column([r[name] for r in rows])
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(raw: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()).permute(2, 0, 1)


@dataclass
class PreferencePairs:
    """Pairs read back for training (tensors only; images stay as PNG bytes unless asked for)."""

    prompts: list[str]  # [N]
    chosen_tokens: torch.Tensor  # [N, T, 64] fp32
    rejected_tokens: torch.Tensor  # [N, T, 64] fp32
    chosen_reward: torch.Tensor  # [N] fp32 primary reward
    rejected_reward: torch.Tensor  # [N]
    image_size: int  # pixels per side the tokens decode to (from the sampler settings)
    # Self-CoT pairs (built with sampling.self_cot): each image's reasoning, as the sampler wrote it; None for
    # image-only datasets. The DPO learner re-builds every sequence from these ids and `cot`'s template.
    chosen_text_ids: list[list[int]] | None = None  # [N] token ids
    rejected_text_ids: list[list[int]] | None = None
    chosen_text_stopped: torch.Tensor | None = None  # [N] bool: ended by a stop token (TextSample.stopped)
    rejected_text_stopped: torch.Tensor | None = None
    chosen_text: list[str] | None = None  # [N] decoded, for people and the dashboard
    rejected_text: list[str] | None = None
    cot: CotConfig | None = None  # the template and limits the reasoning was written with

    @property
    def self_cot(self) -> bool:
        return self.chosen_text_ids is not None

    def __len__(self) -> int:
        return len(self.prompts)


def shard_paths(directory: str | Path) -> list[Path]:
    """The complete shard files of a dataset directory (or the file itself), in order."""
    path = Path(directory)
    if path.is_file():
        return [path]
    return sorted((path / DATA_DIR).glob(SHARD_GLOB)) if (path / DATA_DIR).is_dir() else []


def sampled_image_size(sampling_json: str | None, where: str | Path) -> int:
    """image_size of a row's `sampling` column (the sampler settings as JSON)."""
    try:
        size = json.loads(sampling_json)["image_size"]
    except (TypeError, ValueError, KeyError):
        raise UserError(f"{where}: column 'sampling' holds no sampler settings with an image_size") from None
    if not isinstance(size, int) or isinstance(size, bool):
        raise UserError(f"{where}: column 'sampling' has image_size {size!r}, expected an integer")
    return size


def regular_lists(array: pa.Array) -> tuple[int, pa.Array] | None:
    """A list array whose rows hold the same number of values each, none null -> (that number, the
    rows' values flattened, slice offsets applied); None when it is ragged, has nulls or is not a list."""
    is_list = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    if not (is_list or pa.types.is_fixed_size_list(array.type)) or array.null_count or len(array) == 0:
        return None
    lengths = pc.list_value_length(array).to_numpy()  # [rows]
    if (lengths != lengths[0]).any():
        return None
    return int(lengths[0]), array.flatten()


def token_block(chunk: pa.Array) -> np.ndarray | None:
    """One chunk of a [rows][T][D] list-of-lists column of numbers -> numpy [rows, T, D] viewing Arrow's
    value buffer (no copy, no Python object per number); None when the chunk is not such an array."""
    outer = regular_lists(chunk)  # T, [rows * T] lists
    inner = regular_lists(outer[1]) if outer else None  # D, [rows * T * D] numbers
    if inner is None:
        return None
    values = inner[1]
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)) or values.null_count:
        return None
    return values.to_numpy(zero_copy_only=True).reshape(len(chunk), outer[0], inner[0])


def shard_tokens(path: Path) -> dict[str, list[np.ndarray]]:
    """Both token columns of one shard: name -> numpy blocks [rows of a row group, T, D] over Arrow's
    buffers (the blocks keep the shard's table alive until they are dropped)."""
    table = read_columns(path, {name: "list" for name in TOKEN_COLUMNS}, "preference shard")
    blocks = {name: [token_block(chunk) for chunk in table.column(name).chunks if len(chunk)] for name in TOKEN_COLUMNS}
    for name, parts in blocks.items():
        if any(b is None for b in parts) or len({b.shape[1:] for b in parts}) > 1:
            raise UserError(f"{path}: column '{name}' is not a [pairs, tokens, dims] array of numbers")
    return blocks


def read_tokens(paths: list[Path], counts: list[int]) -> dict[str, torch.Tensor]:
    """Token columns of shards `paths` (of `counts` pairs each) -> name -> fp32 [sum(counts), T, D].

    The first shard with pairs fixes T and D; the shards are read READ_THREADS at a time (pyarrow and
    numpy release the GIL), each copied once into its rows of the result (cast to fp32 there) and
    dropped, so memory peaks at the result plus the shards in flight, never at a Python object per number."""
    starts = np.cumsum([0, *counts])  # [shards + 1] first row of each shard
    first = next(i for i, n in enumerate(counts) if n)
    head = shard_tokens(paths[first])
    out = {
        name: torch.empty((int(starts[-1]), *parts[0].shape[1:]), dtype=torch.float32) for name, parts in head.items()
    }

    def fill(i: int, blocks: dict[str, list[np.ndarray]]) -> None:
        for name, parts in blocks.items():
            if parts and parts[0].shape[1:] != tuple(out[name].shape[1:]):
                raise UserError(f"{paths[i]}: column '{name}' is not a [pairs, tokens, dims] array of numbers")
            row = int(starts[i])
            for block in parts:
                out[name].numpy()[row : row + len(block)] = block
                row += len(block)

    fill(first, head)
    del head
    rest = [i for i in range(first + 1, len(paths)) if counts[i]]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for _ in pool.map(lambda i: fill(i, shard_tokens(paths[i])), rest):  # in order: the first bad shard is named
            pass
    return out


def shard_self_cot(path: Path) -> bool:
    """Whether a (readable) shard holds the Self-CoT columns; some of them but not all is refused, naming it."""
    names = set(pq.read_schema(path).names)
    missing = [name for name in TEXT_FIELDS if name not in names]
    if missing and len(missing) < len(TEXT_FIELDS):
        raise UserError(f"{path}: has Self-CoT text columns but no column '{missing[0]}'")
    return not missing


def dataset_self_cot(paths: list[Path], directory: str | Path) -> bool:
    """Whether every shard is a Self-CoT shard (True) or none is (False); a mix is one UserError."""
    kinds = [shard_self_cot(p) for p in paths]
    if len(set(kinds)) > 1:
        cot, plain = paths[kinds.index(True)].name, paths[kinds.index(False)].name
        raise UserError(f"{directory}: mixes Self-CoT shards ({cot}, with reasoning text) and image-only shards "
                        f"({plain}); build them as separate datasets")  # fmt: skip
    return kinds[0]


def sampled_cot(sampling_values: list[str], self_cot: bool, where: str | Path) -> CotConfig | None:
    """The CotConfig of a dataset's distinct `sampling` column values (already read by `sampled_image_size`),
    None for an image-only dataset; the values must agree with the shards' columns and with each other."""
    settings = [json.loads(s) for s in sampling_values]
    flags = sorted({bool(d.get("self_cot", False)) for d in settings})
    if flags != [self_cot]:
        said = ", ".join(str(f).lower() for f in flags)
        raise UserError(f"{where}: the shards {'have' if self_cot else 'lack'} reasoning text columns but column "
                        f"'sampling' says self_cot: {said}")  # fmt: skip
    if not self_cot:
        return None
    cots = {json.dumps(d.get("cot"), sort_keys=True) for d in settings}
    if len(cots) > 1:
        raise UserError(f"{where}: pairs written with {len(cots)} different CoT settings (sampling.cot, e.g. "
                        f"templates); a Self-CoT dataset takes one")  # fmt: skip
    try:
        cot = CotConfig(**settings[0]["cot"])
    except (KeyError, TypeError):
        raise UserError(f"{where}: column 'sampling' holds no valid 'cot' settings") from None
    cot.validate(f"{where}: sampling.cot")
    return cot


def id_lists(column: pa.ChunkedArray, name: str, where: str | Path) -> list[list[int]]:
    """A list<integer> column [N] -> N Python lists of ids (what PreferencePairs holds; texts are short)."""
    values = pc.list_flatten(column)
    if column.null_count or values.null_count or not pa.types.is_integer(values.type):
        raise UserError(f"{where}: column '{name}' is not a list of token ids per row")
    return column.to_pylist()


def read_texts(paths: list[Path], directory: str | Path) -> dict[str, list | torch.Tensor]:
    """The Self-CoT columns of shards `paths` -> PreferencePairs' text fields (ids, stopped [N] bool, strings)."""
    kinds = {"chosen_text": "string", "rejected_text": "string", "chosen_text_ids": "list", "rejected_text_ids": "list",
             "chosen_text_stopped": "any", "rejected_text_stopped": "any"}  # fmt: skip
    table = concat_same_schema([read_columns(p, kinds, "preference shard") for p in paths], paths)
    out = {}
    for name in TEXT_FIELDS:
        column = table.column(name)
        if column.null_count:
            raise UserError(f"{directory}: column '{name}' has {column.null_count} empty rows")
        if name in TEXT_ID_COLUMNS:
            out[name] = id_lists(column, name, directory)
        elif kinds[name] == "any":  # the stopped flags
            if not pa.types.is_boolean(column.type):
                raise UserError(f"{directory}: column '{name}' is {column.type}, expected bool")
            out[name] = torch.from_numpy(np.array(column.to_numpy(), dtype=bool))  # [N]
        else:
            out[name] = column.to_pylist()
    return out


def read_pairs(directory: str | Path) -> PreferencePairs:
    """All pairs of a build-prefs output directory (or one shard file); a Self-CoT dataset also fills the
    text fields and `cot`, an image-only one leaves them None."""
    paths = shard_paths(directory)
    if not paths:
        raise UserError(f"no preference shards in {directory} (expected {DATA_DIR}/{SHARD_GLOB})")
    cols = {"prompt": "string", "chosen_reward": "number", "rejected_reward": "number", "sampling": "string"}
    tables = [read_columns(p, cols, "preference shard") for p in paths]  # one-line errors naming file and column
    table = concat_same_schema(tables, paths)
    if table.num_rows == 0:
        raise UserError(f"{directory}: the preference dataset has no pairs")
    sampling_values = pc.unique(table.column("sampling")).to_pylist()
    sizes = {sampled_image_size(s, directory) for s in sampling_values}
    if len(sizes) != 1:
        raise UserError(f"{directory}: pairs of several image sizes {sorted(sizes)}")
    self_cot = dataset_self_cot(paths, directory)
    cot = sampled_cot(sampling_values, self_cot, directory)

    def rewards(name: str) -> torch.Tensor:
        column = table.column(name)
        if column.null_count:
            raise UserError(f"{directory}: column '{name}' has {column.null_count} empty rows")
        return torch.from_numpy(np.array(column.to_numpy(), dtype=np.float32))  # [N], a copy torch may write to

    tokens = read_tokens(paths, [t.num_rows for t in tables])
    texts = read_texts(paths, directory) if self_cot else {}
    return PreferencePairs(
        prompts=table.column("prompt").to_pylist(),
        chosen_tokens=tokens["chosen_tokens"], rejected_tokens=tokens["rejected_tokens"],
        chosen_reward=rewards("chosen_reward"), rejected_reward=rewards("rejected_reward"),
        image_size=sizes.pop(), cot=cot, **texts,
    )  # fmt: skip
