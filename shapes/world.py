"""The shapes world's config and data: what `nsalign shapes-world` (jobs/shapes_world.py) rebuilds.

WorldConfig (`configs/shapes_world/*.yaml`): data splits, the tiny VAE's training, the tiny NextStep's sizes,
its pre-training config, its Self-CoT SFT config and the held-out evaluation. `write_data` writes every split
file, `world_images` renders the images the VAE trains on, `rewards_config` names the rule reward that scores
the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from core.schema import to_dict
from shapes.scenes import all_specs, caption, render
from shapes.splits import WorldDataConfig, image_split, partition, prompt_split, write_metadata, write_parquet
from shapes.train_vae import VaeTrainConfig

DETECTOR = "shapes"  # the built-in name of rewards.shapes_detect.ShapesDetector in rewards.geneval


@dataclass
class ModelSizeConfig:
    """Sizes of the tiny NextStep (overrides of the `tiny` preset)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    fm_head_dim: int = 128
    fm_head_layers: int = 3

    def validate(self, where: str = "model") -> None:
        for name, value in to_dict(self).items():
            if value < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}.num_attention_heads: must divide hidden_size and be a multiple of "
                              "num_key_value_heads")  # fmt: skip


@dataclass
class WorldEvalConfig:
    """Held-out evaluation of the pre-trained model: eval prompts x seeds, rule reward."""

    seeds_per_prompt: int = 2
    cfg_scale: float = 3.0  # pre-training drops 10% of captions: the unconditional branch CFG needs
    num_head_steps: int = 25
    batch_size: int = 32
    grid_prompts: int = 16  # rows of the sample grid (4 seeds each)


@dataclass
class WorldConfig:
    """`configs/shapes_world/*.yaml`: everything `build_world` rebuilds."""

    data: WorldDataConfig = field(default_factory=WorldDataConfig)
    vae: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    model: ModelSizeConfig = field(default_factory=ModelSizeConfig)
    pretrain_config: str = "configs/shapes/pretrain.yaml"  # an SftConfig; model/data/runs_root are set here
    pretrain_overrides: list[str] = field(default_factory=list)  # extra key=value for it
    # Self-CoT SFT of the pre-trained model on the plans split ("" skips it); model/data.path/runs_root are set here
    cot_config: str = "configs/shapes/cot.yaml"
    cot_overrides: list[str] = field(default_factory=list)  # extra key=value for it
    eval: WorldEvalConfig = field(default_factory=WorldEvalConfig)
    seed: int = 0  # NextStep init


def world_images(config: WorldDataConfig) -> torch.Tensor:
    """uint8 [N, 3, S, S]: the pre-training split's images (what the VAE trains on)."""
    return torch.from_numpy(np.stack([render(e.scene, config.image_size) for e in image_split(config, "pretrain")]))\
        .permute(0, 3, 1, 2).contiguous()  # fmt: skip


def write_data(config: WorldDataConfig, out: Path) -> dict[str, Path]:
    """All split files under out/ (see the module docstring)."""
    files = {
        "pretrain": write_parquet(image_split(config, "pretrain"), out / "pretrain.parquet", config.image_size),
        "sft": write_parquet(image_split(config, "sft"), out / "sft.parquet", config.image_size),
        "heldout": write_parquet(image_split(config, "heldout"), out / "heldout.parquet", config.image_size),
        "cot": write_parquet(image_split(config, "cot"), out / "cot.parquet", config.image_size, plans=True),
        "prefs": write_metadata([e.spec for e in prompt_split(config, "prefs")], out / "prefs.jsonl"),
        "eval": write_metadata([e.spec for e in prompt_split(config, "eval")], out / "eval.jsonl"),
        "metadata": write_metadata(all_specs(config.colors, config.shapes), out / "metadata.jsonl"),
    }
    pools = partition(config)
    held_out = sorted(s for kind in pools["eval"].values() for s in map(caption, kind))
    (out / "eval_pool.txt").write_text("".join(c + "\n" for c in held_out), encoding="utf-8")
    return files


def rewards_config(metadata: Path, score: str = "strict") -> dict:
    """A RewardsConfig mapping with the shapes rule reward (strict or partial score)."""
    params = {"metadata": str(metadata), "detector": DETECTOR, "score": score}
    return {"rewards": [{"name": "shapes", "type": "geneval", "params": params}], "device": "cpu"}
