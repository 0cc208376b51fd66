"""Checkpoints in the published NextStep-1 layout, read and written.

    DIR/config.json                        model_type "nextstep"
    DIR/model-0000i-of-0000n.safetensors   shards (keys without a `model.` prefix)
    DIR/model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {key: shard}}
    DIR/tokenizer.json, tokenizer_config.json, ...
    DIR/vae/checkpoint.pt + DIR/vae/config.json

A single `model.safetensors` is read too. Writes go to a temporary sibling directory that is renamed
into place at the end, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from base_model.config import RANDOM_PRESETS, NextStepConfig, preset_config
from base_model.model import NextStepModel, gen_pos_embed_table
from base_model.tokenizer import SpecialIds, build_tiny_tokenizer, load_tokenizer, special_ids
from base_model.vae import NextStepVAE, load_vae, save_vae, vae_preset
from core.errors import CheckpointError, check_state_dict
from core.files import replace_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# NextStep-1's model always holds this buffer; it is read only when config.use_gen_pos_embed
GEN_POS_KEY = "gen_pos_embed"
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass
class NextStepBundle:
    """Everything needed to sample or train: backbone+head, tokenizer, its special ids, and the VAE."""

    model: NextStepModel
    tokenizer: object  # transformers PreTrainedTokenizerFast
    ids: SpecialIds
    vae: NextStepVAE


def build_random(
    preset: str = "tiny", seed: int = 0, vae_preset_name: str = "tiny", overrides: dict | None = None
) -> NextStepBundle:
    """A randomly initialised model of a preset (+ config `overrides`) with the in-process byte-level tokenizer."""
    tok = build_tiny_tokenizer()
    ids = special_ids(tok)
    config = preset_config(
        preset, vocab_size=len(tok), pad_token_id=ids.pad, pad_token_id_added=ids.pad,
        image_area_id=ids.image_area, boi=ids.boi, eoi=ids.eoi, image_placeholder_id=ids.placeholder,
        **(overrides or {}),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    model = NextStepModel(config)
    model.init_weights(generator=gen)
    torch.manual_seed(seed)
    vae = NextStepVAE(vae_preset(vae_preset_name))
    return NextStepBundle(model=model.eval(), tokenizer=tok, ids=ids, vae=vae.eval())


# -- writing ----------------------------------------------------------------------------------


def save_checkpoint(
    bundle: NextStepBundle,
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `bundle` in the published layout (atomically replacing `directory`)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = {k: v.detach() for k, v in bundle.model.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        shards = _split_shards(state, max_shard_bytes)
        weight_map, total = {}, 0
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {k: state[k].contiguous().cpu() for k in keys}
            save_file(part, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
            total += sum(t.numel() * t.element_size() for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        config = bundle.model.config.to_dict()
        config.pop("_attn_implementation_internal", None)
        config.update(model_type="nextstep", architectures=["NextStep"], vae_name_or_path="vae")
        if dtype is not None:
            config["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        bundle.tokenizer.save_pretrained(str(tmp))
        save_vae(bundle.vae, tmp / "vae")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def save_published(
    bundle: NextStepBundle, weights: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None = None
) -> None:
    """Plain-model `weights` (`Learner.policy_weights()`: gathered under ZeRO-3, LoRA merged) into the
    published layout, with the bundle's tokenizer and VAE. Never the engine's module state: under
    ZeRO-3 its parameters are empty partitions."""
    with torch.device("meta"):
        plain = NextStepModel(bundle.model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    save_checkpoint(dataclasses.replace(bundle, model=plain), directory, dtype=dtype)


# -- reading ----------------------------------------------------------------------------------


def load_config(directory: str | Path) -> NextStepConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {directory} a NextStep checkpoint directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if data.get("model_type") not in ("nextstep", None):
        raise CheckpointError(f"{path}: model_type is {data.get('model_type')!r}, expected 'nextstep'")
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    return NextStepConfig(**data)


def read_state_dict(directory: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the model shards (index or single file), checked for corruption, on CPU."""
    directory = Path(directory)
    index_path, single = directory / INDEX_NAME, directory / SINGLE_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [SINGLE_NAME]
    else:
        raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    t = f.get_tensor(key)
                    state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{path}: corrupt safetensors shard ({e})") from None
    if weight_map is not None:
        listed_missing = sorted(set(weight_map) - set(state))
        if listed_missing:
            raise CheckpointError(f"{index_path}: keys listed but absent from shards: {listed_missing[:3]}")
    return state


def load_checkpoint(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> NextStepBundle:
    """Read a checkpoint directory written by us or published by the authors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    ids = special_ids(tokenizer, config)
    with torch.device("meta"):
        model = NextStepModel(config)
    state = read_state_dict(directory, dtype)
    state = with_gen_pos_embed(state, config, dtype)
    check_state_dict(directory, state, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    model.place(device=device, dtype=dtype)  # also rebuilds the non-persistent RoPE buffer off meta
    vae = load_vae(directory / (config.vae_name_or_path or "vae"), dtype=dtype, device=device)
    return NextStepBundle(model=model.eval(), tokenizer=tokenizer, ids=ids, vae=vae.eval())


def with_gen_pos_embed(
    state: dict[str, torch.Tensor], config: NextStepConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The published checkpoint's `gen_pos_embed` as our model wants it: dropped when the config does not
    use it (the published pipeline ignores it then); when it does and the weights lack it, the table
    NextStep builds at init (its loader keeps that one too)."""
    if not config.use_gen_pos_embed:
        return {k: v for k, v in state.items() if k != GEN_POS_KEY}
    if GEN_POS_KEY in state:
        return state
    table = gen_pos_embed_table(config.hidden_size)
    return {**state, GEN_POS_KEY: table if dtype is None else table.to(dtype)}


def resolve_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> NextStepBundle:
    """`tiny` / `mid` -> a random model of that preset; anything else is a checkpoint directory."""
    if spec in RANDOM_PRESETS:
        bundle = build_random(spec, seed=seed)
        bundle.model.place(device=device, dtype=dtype)
        bundle.vae.to(device=device, dtype=dtype)
        return bundle
    return load_checkpoint(spec, dtype=dtype, device=device)


# -- verifying (in the driver, before any worker loads the model) ---------------------------------

# bytes per element of the safetensors dtypes (the format's names); other dtypes are not size-checked
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit on the JSON header


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def tensor_entry_problem(entry: object) -> str | None:
    """What is wrong with one safetensors header entry {dtype, shape, data_offsets}, or None."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"dtype {dtype!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return f"data_offsets {offsets!r}"
    if offsets[0] > offsets[1]:
        return f"data_offsets {offsets} end before they begin"
    if dtype in SAFETENSORS_ITEMSIZE:
        nbytes = SAFETENSORS_ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            return f"{dtype} {shape} needs {nbytes} bytes, its data_offsets span {offsets[1] - offsets[0]}"
    return None


def shard_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header (name -> {dtype, shape, data_offsets}), checked
    against the file's length without reading any tensor.

    Layout: an 8-byte little-endian length N, N bytes of JSON, then the data. Offsets count from the
    start of the data and the entries tile [0, end) without gaps, so the file is 8 + N + end bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if size < 8 or n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors shard ({size} bytes cannot hold its header)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors shard (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors shard (header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in sorted(header.items(), key=lambda kv: _span_key(kv[1])):
        problem = tensor_entry_problem(entry)
        if problem is None and entry["data_offsets"][0] != end:
            problem = f"data starts at byte {entry['data_offsets'][0]}, the previous tensor ends at {end}"
        if problem:
            raise CheckpointError(f"{path}: corrupt safetensors shard (tensor {name}: {problem})")
        end = entry["data_offsets"][1]
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(f"{path}: truncated safetensors shard ({size} bytes, its header describes {expected})")
    if size > expected:
        raise CheckpointError(f"{path}: corrupt safetensors shard ({size - expected} bytes after the tensor data)")
    return header


def _span_key(entry: object) -> tuple:
    """Sort key by data offsets; malformed entries first, so they are reported rather than crash the sort."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets):
        return (1, offsets[0], offsets[1])
    return (0, 0, 0)


def verify_shards(directory: str | Path) -> list[Path]:
    """Every model shard of a checkpoint directory checked by `shard_header`; with an index, each shard it
    names must exist and hold the keys it lists. Returns the shard paths. Reads headers only."""
    directory = Path(directory)
    index_path, single = directory / INDEX_NAME, directory / SINGLE_NAME
    if not index_path.is_file():
        if not single.is_file():
            raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME}")
        shard_header(single)
        return [single]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    keys_of: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        keys_of.setdefault(name, []).append(key)
    paths = []
    for name in sorted(keys_of):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing")
        header = shard_header(path)
        absent = [k for k in keys_of[name] if k not in header]
        if absent:
            raise CheckpointError(f"{path}: {len(absent)} keys listed in {INDEX_NAME} are absent, e.g. {absent[0]}")
        paths.append(path)
    return paths


def verify_model_spec(spec: str) -> None:
    """What `resolve_model(spec)` will need, checked in the driver before workers start: a preset passes;
    a directory needs a readable config.json and sound shards (a worker dying in its constructor on
    Ray ends the job with a wall of tracebacks instead of one line naming the file)."""
    if spec in RANDOM_PRESETS:
        return
    if not Path(spec).is_dir():
        raise CheckpointError(f"{spec}: checkpoint directory not found")
    load_config(spec)
    verify_shards(spec)
