"""The preference-dataset format `nsalign build-prefs` writes and `nsalign dpo` reads.

    <out>/config.yaml                    the resolved build config (a resume must match it)
    <out>/data/shard-000000.parquet      rows of pairs; one shard per block of `prompts_per_shard`
                                         prompts, written atomically (a shard file exists = done)
    <out>/manifest.json                  counts, reward names, sampler settings, checkpoint, shards

Every row is one pair: the prompt, both images as PNG bytes, both images' tokens (what the DPO
learner trains on), every reward's score for both, both seeds and sample indices, and the provenance
(sampler settings as JSON, the generating checkpoint, policy version, pair strategy).
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
import torch
from PIL import Image

from base_model.text import CotConfig
from core.errors import UserError
from core.formats import PREFS_DATA_DIR, PREFS_MANIFEST, SHARD_GLOB
from core.tables import concat_same_schema, read_columns

DATA_DIR, MANIFEST = PREFS_DATA_DIR, PREFS_MANIFEST  # core/formats.py names every result file once
TOKEN_COLUMNS = ("chosen_tokens", "rejected_tokens")  # [T][D] numbers per row, read without Python lists
READ_THREADS = min(8, os.cpu_count() or 1)  # shards decoded at once by read_pairs


def pairs_schema(reward_names: list[str]) -> pa.Schema:
    """Arrow schema of a pair row; scores are structs {reward name: float}."""
    scores = pa.struct([(name, pa.float32()) for name in reward_names])
    tokens = pa.list_(pa.list_(pa.float32()))  # [T][64]
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


def pairs_table(rows: list[dict], reward_names: list[str]) -> pa.Table:
    """Rows (tokens as [T, D] arrays or tensors) -> a table of `pairs_schema`; the token columns go through
    `token_column`, the rest through Arrow's row conversion."""
    schema = pairs_schema(reward_names)
    plain = [{k: v for k, v in r.items() if k not in TOKEN_COLUMNS} for r in rows]
    columns = {f.name: pa.array([r[f.name] for r in plain], type=f.type) for f in schema if f.name not in TOKEN_COLUMNS}
    for name in TOKEN_COLUMNS:
        columns[name] = token_column([np.asarray(r[name], dtype=np.float32) for r in rows])
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


def read_pairs(directory: str | Path) -> PreferencePairs:
    """All pairs of a build-prefs output directory (or one shard file)."""
    paths = shard_paths(directory)
    if not paths:
        raise UserError(f"no preference shards in {directory} (expected {DATA_DIR}/{SHARD_GLOB})")
    cols = {"prompt": "string", "chosen_reward": "number", "rejected_reward": "number", "sampling": "string"}
    tables = [read_columns(p, cols, "preference shard") for p in paths]  # one-line errors naming file and column
    table = concat_same_schema(tables, paths)
    if table.num_rows == 0:
        raise UserError(f"{directory}: the preference dataset has no pairs")
    sizes = {sampled_image_size(s, directory) for s in pc.unique(table.column("sampling")).to_pylist()}
    if len(sizes) != 1:
        raise UserError(f"{directory}: pairs of several image sizes {sorted(sizes)}")

    def rewards(name: str) -> torch.Tensor:
        column = table.column(name)
        if column.null_count:
            raise UserError(f"{directory}: column '{name}' has {column.null_count} empty rows")
        return torch.from_numpy(np.array(column.to_numpy(), dtype=np.float32))  # [N], a copy torch may write to

    tokens = read_tokens(paths, [t.num_rows for t in tables])
    return PreferencePairs(
        prompts=table.column("prompt").to_pylist(),
        chosen_tokens=tokens["chosen_tokens"], rejected_tokens=tokens["rejected_tokens"],
        chosen_reward=rewards("chosen_reward"), rejected_reward=rewards("rejected_reward"),
        image_size=sizes.pop(),
    )  # fmt: skip
