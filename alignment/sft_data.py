"""SFT input: (caption, image) pairs from a Parquet file or WebDataset tar shards, decoded to tensors.

`data.path` is one of
  - a Parquet file with a caption column and an image column (PNG/JPEG bytes);
  - WebDataset shards: a `.tar` file, a directory of `.tar` shards (sorted by name), or a brace
    pattern `data/shard-{000000..000009}.tar` (numeric ranges keep their zero padding; `{a,b}` lists).
    A sample is the files sharing a key (the member path up to the first dot of its name): one
    image (.png/.jpg/.jpeg/.webp) and a caption (.txt, or .json with a `caption_field` / `prompt`
    field; .txt wins when both are there). Other files are ignored. Read with the standard
    library `tarfile`; samples keep shard order, then member order, so the data order is fixed.
`reasoning_field` (optional) names a string column (Parquet) or a .json field (WebDataset) holding each
sample's reasoning text, which Self-CoT SFT trains between the caption and the image (`SftConfig.cot_fraction`).
Every problem ends with one `UserError` naming the file (and the row or sample key).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.errors import UserError
from core.tables import read_columns

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXTS = ("txt", "json")
# Decoded-size caps, checked from the header before any pixel is decoded: 32 MiPixels (e.g. 8192 x 4096,
# ~100 MB as RGB) is far above any SFT image we crop down to 64..1024 px, and far below a PNG bomb.
MAX_IMAGE_PIXELS = 32 * 2**20
MAX_MEMBER_BYTES = 256 * 2**20  # one file inside a tar shard


@dataclass
class SftDataConfig:
    path: str = ""  # Parquet file, or WebDataset shards: a .tar, a directory of .tar, or shard-{000..009}.tar
    caption_field: str = "caption"  # Parquet column; WebDataset: the .json field (else `prompt`)
    image_field: str = "image"  # Parquet column (WebDataset: the .png/.jpg/.jpeg/.webp file)
    image_size: int = 64  # pixels per side; multiple of 16
    reasoning_field: str | None = None  # Parquet column / WebDataset .json field of each sample's reasoning text


@dataclass
class SftSamples:
    """Every pair's caption and its image still as file bytes (PNG/JPEG: the compressed size); pixels are
    decoded, cropped and resized only for the samples a micro batch asks for (`images`)."""

    captions: list[str]  # [N]
    raw: list[bytes]  # [N] image file bytes
    where: list[str]  # [N] file and row / sample key, named in errors
    image_size: int
    reasonings: list[str] | None = None  # [N] reasoning texts (data.reasoning_field), None without one

    def __len__(self) -> int:
        return len(self.captions)

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 [len(indices), 3, S, S] (centre crop + resize) of the samples `indices`."""
        return torch.stack([center_square(read_image(self.raw[i], self.where[i]), self.image_size) for i in indices])


def load_samples(config: SftDataConfig) -> SftSamples:
    """Captions and image bytes of every pair; each caption is checked and each image's header read (format
    and size, no pixels decoded) so bad input stops here, before any run directory exists."""
    records = read_tar_records(config) if is_webdataset(config.path) else read_parquet_records(config)
    captions, raw, where_of, reasonings = [], [], [], []
    for where, caption, data, reasoning in records:
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"{where}: empty caption")
        if config.reasoning_field is not None and (not isinstance(reasoning, str) or not reasoning.strip()):
            raise UserError(f"{where}: empty reasoning ('{config.reasoning_field}')")
        read_image(data, where, header_only=True)
        captions.append(caption)
        raw.append(data)
        where_of.append(where)
        reasonings.append(reasoning)
    return SftSamples(captions, raw, where_of, config.image_size,
                      reasonings if config.reasoning_field is not None else None)  # fmt: skip


def load_pairs(config: SftDataConfig) -> tuple[list[str], torch.Tensor]:
    """Captions [N] and images uint8 [N, 3, S, S] (centre crop + resize), all decoded at once."""
    samples = load_samples(config)
    return samples.captions, samples.images(range(len(samples)))


def read_image(raw: object, where: str, header_only: bool = False):
    """`decode_image` with every decoder failure as one UserError naming `where`; header_only: open and
    size-check without decoding the pixels (returns None)."""
    try:
        return decode_image(raw, where, header_only)
    except (UnidentifiedImageError, TypeError, OSError, ValueError, SyntaxError, EOFError):
        raise UserError(f"{where}: image bytes are not a readable image") from None


def decode_image(raw: bytes, where: str, header_only: bool = False):
    """Image bytes -> RGB PIL image, refusing (UserError naming `where`) an image whose header declares
    more than MAX_IMAGE_PIXELS; PIL's own decompression-bomb warning counts as an error too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(f"{where}: image of {w}x{h} pixels is over the cap of {MAX_IMAGE_PIXELS} pixels "
                                "(a decompression bomb?)")  # fmt: skip
            return None if header_only else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{where}: refused as a decompression bomb ({e})") from None


def is_webdataset(path: str) -> bool:
    return "{" in path or path.endswith(".tar") or Path(path).is_dir()


def read_parquet_records(config: SftDataConfig) -> list[tuple[str, object, object, object]]:
    """(where, caption, image bytes, reasoning or None) per row of a Parquet file."""
    path = Path(config.path)
    if not path.is_file():
        raise UserError(f"SFT data not found: {path}")
    columns = {config.caption_field: "string", config.image_field: "binary"}
    if config.reasoning_field is not None:
        columns[config.reasoning_field] = "string"
    table = read_columns(path, columns, "SFT data")
    captions = table.column(config.caption_field).to_pylist()
    if not captions:
        raise UserError(f"{path}: no rows")
    images = table.column(config.image_field).to_pylist()
    reasonings = (table.column(config.reasoning_field).to_pylist() if config.reasoning_field is not None
                  else [None] * len(captions))  # fmt: skip
    return [(f"{path}: row {i}", *row) for i, row in enumerate(zip(captions, images, reasonings))]


def read_tar_records(config: SftDataConfig) -> list[tuple[str, object, bytes, object]]:
    """(where, caption, image bytes, reasoning or None) per sample of every shard, in shard then member order."""
    records = []
    for shard in shard_paths(config.path):
        samples: dict[str, dict[str, bytes]] = {}  # key -> {ext: bytes}, in order of first appearance
        try:
            with tarfile.open(shard, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if not dot or name.startswith("."):
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    if member.size > MAX_MEMBER_BYTES:
                        raise UserError(f"{shard}: sample {key!r}: {name} is {member.size} bytes, over the cap "
                                        f"of {MAX_MEMBER_BYTES}")  # fmt: skip
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{shard}: not a readable tar file ({e})") from None
        if not samples:
            raise UserError(f"{shard}: empty shard (no samples)")
        for key, files in samples.items():
            records.append((f"{shard}: sample {key!r}", *_sample_pair(shard, key, files, config)))
    return records


def _sample_pair(shard: Path, key: str, files: dict[str, bytes], config: SftDataConfig) -> tuple[object, bytes, object]:
    """(caption, image bytes, reasoning or None) of one sample's files."""
    images = [e for e in IMAGE_EXTS if e in files]
    if len(images) != 1:
        found = ", ".join(sorted(files))
        raise UserError(f"{shard}: sample {key!r} needs exactly one image (.png/.jpg/.jpeg/.webp), has: {found}")
    if "txt" not in files and "json" not in files:
        raise UserError(f"{shard}: sample {key!r} has an image but no caption (.txt or .json)")
    # the .json is read only when needed: a .txt caption and no reasoning field leave it unread
    meta = _json_meta(shard, key, files["json"]) if "json" in files and ("txt" not in files or
                                                                         config.reasoning_field) else None  # fmt: skip
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = meta.get(config.caption_field, meta.get("prompt")) if isinstance(meta, dict) else None
    reasoning = meta.get(config.reasoning_field) if config.reasoning_field and isinstance(meta, dict) else None
    return caption, files[images[0]], reasoning


def _json_meta(shard: Path, key: str, raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(f"{shard}: sample {key!r}: .json is not valid JSON") from None


def shard_paths(spec: str) -> list[Path]:
    """A .tar file, a directory of .tar shards, or a brace pattern -> existing shard files, in order."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise UserError(f"{path}: no .tar shards in the directory")
        return shards
    shards = [Path(p) for p in expand_braces(spec)]
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"SFT data not found: {shard}")
    return shards


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` -> x, y; several braces multiply."""
    parts = re.split(r"\{([^{}]*)\}", pattern)  # literal, brace, literal, brace, ..., literal
    choices = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            choices.append([part])
            continue
        m = re.fullmatch(r"(\d+)\.\.(\d+)", part)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise UserError(f"{pattern}: empty range {{{part}}}")
            choices.append([str(n).zfill(len(m[1])) for n in range(lo, hi + 1)])
        else:
            choices.append(part.split(","))
    return ["".join(c) for c in itertools.product(*choices)]


def center_square(img, size: int) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size]: centre crop to a square, bicubic resize."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
