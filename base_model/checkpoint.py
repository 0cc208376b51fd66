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

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from base_model.config import NextStepConfig, preset_config
from base_model.errors import CheckpointError, check_state_dict
from base_model.model import NextStepModel
from base_model.tokenizer import SpecialIds, build_tiny_tokenizer, load_tokenizer, special_ids
from base_model.vae import NextStepVAE, load_vae, save_vae, vae_preset

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_KEYS = ("gen_pos_embed",)  # present in some published checkpoints; unused by the model
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
    from safetensors.torch import save_file

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
        cfg = bundle.model.config.to_dict()
        cfg.pop("_attn_implementation_internal", None)
        cfg.update(model_type="nextstep", architectures=["NextStep"], vae_name_or_path="vae")
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        bundle.tokenizer.save_pretrained(str(tmp))
        save_vae(bundle.vae, tmp / "vae")
        _replace_dir(tmp, directory)
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


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


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
    from safetensors import safe_open

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
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_KEYS)}
    check_state_dict(directory, state, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    model.place(device=device, dtype=dtype)  # also rebuilds the non-persistent RoPE buffer off meta
    vae = load_vae(directory / (config.vae_name_or_path or "vae"), dtype=dtype, device=device)
    return NextStepBundle(model=model.eval(), tokenizer=tokenizer, ids=ids, vae=vae.eval())


def resolve_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> NextStepBundle:
    """`tiny` / `mid` -> a random model of that preset; anything else is a checkpoint directory."""
    if spec in ("tiny", "mid"):
        bundle = build_random(spec, seed=seed)
        bundle.model.place(device=device, dtype=dtype)
        bundle.vae.to(device=device, dtype=dtype)
        return bundle
    return load_checkpoint(spec, dtype=dtype, device=device)
