"""Where a learner's weights come from, read one tensor at a time.

`open_model(spec)` gives the model's config, tokenizer, special ids and VAE at once, and its weights as
`read(key)`: a checkpoint directory (published layout) is read lazily, one tensor per call, from its
safetensors shards (memory-mapped: reading a key loads that tensor only); a random preset (tiny, mid:
test-sized) is built whole once. The learner builds its modules itself (under ZeRO-3 inside
deepspeed.zero.Init, every parameter partitioned at construction) and pulls the weights in parameter by
parameter (alignment/learner_state.py), so no process ever holds the whole model in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from base_model.checkpoint import (
    GEN_POS_KEY,
    INDEX_NAME,
    SINGLE_NAME,
    NextStepBundle,
    build_random,
    load_config,
    with_gen_pos_embed,
)
from base_model.config import RANDOM_PRESETS, NextStepConfig
from base_model.model import NextStepModel
from base_model.tokenizer import load_tokenizer, special_ids
from base_model.vae import load_vae
from core.errors import CheckpointError


@dataclass
class ModelSource:
    """A model's parts without its weights, and `read(key) -> fp32 CPU tensor` for each state-dict key."""

    config: NextStepConfig
    tokenizer: object
    ids: object  # SpecialIds
    vae: torch.nn.Module
    read: Callable[[str], torch.Tensor]
    where: str  # named in errors
    keys: list[str] = field(default_factory=list)  # every key `read` serves

    def build(self) -> NextStepModel:
        """A fresh module of this config (its weights are whatever the construction context makes them)."""
        return NextStepModel(self.config)

    def bundle(self, model: torch.nn.Module) -> NextStepBundle:
        """The bundle the jobs use, around `model` (the learner's module: under ZeRO-3 partitioned)."""
        return NextStepBundle(model=model, tokenizer=self.tokenizer, ids=self.ids, vae=self.vae)


def open_model(spec: str, seed: int = 0) -> ModelSource:
    """`tiny` / `mid` -> a random model of that preset (built whole: test sizes); else a checkpoint directory."""
    if spec in RANDOM_PRESETS:
        bundle = build_random(spec, seed=seed)
        state = {k: v.detach() for k, v in bundle.model.state_dict().items()}
        return ModelSource(bundle.model.config, bundle.tokenizer, bundle.ids, bundle.vae.eval(),
                           lambda key: state[key].float(), spec, list(state))  # fmt: skip
    directory = Path(spec)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    vae = load_vae(directory / (config.vae_name_or_path or "vae"))
    read, keys = lazy_reader(directory, config)
    return ModelSource(config, tokenizer, special_ids(tokenizer, config), vae.eval(), read, str(directory), keys)


def lazy_reader(directory: Path, config: NextStepConfig) -> tuple[Callable[[str], torch.Tensor], list[str]]:
    """(read, keys) over the shards of `directory`: read(key) opens the key's shard (kept open, memory-mapped)
    and returns that one tensor as fp32 on the CPU; gen_pos_embed as with_gen_pos_embed makes it."""
    index_path, single = directory / INDEX_NAME, directory / SINGLE_NAME
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
    elif single.is_file():
        weight_map = {key: SINGLE_NAME for key in _keys_of(single)}
    else:
        raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME}")
    handles: dict[str, object] = {}
    needs_table = config.use_gen_pos_embed and GEN_POS_KEY not in weight_map

    def read(key: str) -> torch.Tensor:
        if needs_table and key == GEN_POS_KEY:
            return with_gen_pos_embed({}, config)[GEN_POS_KEY].float()
        if key not in weight_map:
            raise CheckpointError(f"{directory}: no tensor {key}")
        name = weight_map[key]
        try:
            if name not in handles:
                handles[name] = safe_open(str(directory / name), framework="pt", device="cpu")
            tensor = handles[name].get_tensor(key)
        except Exception as e:  # safetensors raises its own types for missing, truncated or corrupt files
            raise CheckpointError(f"{directory / name}: unreadable tensor {key} ({e})") from None
        return tensor.float() if tensor.is_floating_point() else tensor

    keys = [k for k in weight_map if config.use_gen_pos_embed or k != GEN_POS_KEY]
    return read, keys + ([GEN_POS_KEY] if needs_table else [])


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt safetensors shard ({e})") from None
