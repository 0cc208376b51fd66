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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from core.errors import UserError
from core.formats import PREFS_DATA_DIR, PREFS_MANIFEST, SHARD_GLOB
from core.tables import concat_same_schema, read_columns

DATA_DIR, MANIFEST = PREFS_DATA_DIR, PREFS_MANIFEST  # core/formats.py names every result file once


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


def read_pairs(directory: str | Path) -> PreferencePairs:
    """All pairs of a build-prefs output directory (or one shard file)."""
    paths = shard_paths(directory)
    if not paths:
        raise UserError(f"no preference shards in {directory} (expected {DATA_DIR}/{SHARD_GLOB})")
    cols = {"prompt": "string", "chosen_tokens": "list", "rejected_tokens": "list", "chosen_reward": "number",
            "rejected_reward": "number", "sampling": "string"}  # fmt: skip
    tables = [read_columns(p, cols, "preference shard") for p in paths]  # one-line errors naming file and column
    table = concat_same_schema(tables, paths)
    if table.num_rows == 0:
        raise UserError(f"{directory}: the preference dataset has no pairs")
    sizes = {sampled_image_size(s, directory) for s in table.column("sampling").to_pylist()}
    if len(sizes) != 1:
        raise UserError(f"{directory}: pairs of several image sizes {sorted(sizes)}")

    def tokens(name: str) -> torch.Tensor:
        try:
            return torch.tensor(table.column(name).to_pylist(), dtype=torch.float32)
        except (ValueError, TypeError):  # ragged or null rows
            raise UserError(f"{directory}: column '{name}' is not a [pairs, tokens, dims] array of numbers") from None

    return PreferencePairs(
        prompts=table.column("prompt").to_pylist(),
        chosen_tokens=tokens("chosen_tokens"), rejected_tokens=tokens("rejected_tokens"),
        chosen_reward=torch.tensor(table.column("chosen_reward").to_pylist(), dtype=torch.float32),
        rejected_reward=torch.tensor(table.column("rejected_reward").to_pylist(), dtype=torch.float32),
        image_size=sizes.pop(),
    )  # fmt: skip
