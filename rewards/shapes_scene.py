"""A shaped reward of the shapes world (`type: shapes_scene`): GenEval's clauses with credit that grows
as a drawn shape gets closer to the one asked for, for RL and pair ranking (evaluation keeps GenEval's
strict and partial scores, `type: geneval`).

Why: on a weak model, GenEval's partial credit is nearly flat in what the model must learn (a rounded
square reads as a circle: the clause fails whether the corners are almost right or not at all) and it
pays for extra objects (each one is another chance to satisfy a clause). Here, per image and prompt:
- each `include` entry: the best `count` unused detections of its colour, each credited
  `shape_credit(fill ratio, wanted shape)` in [0, 1] (missing ones 0), averaged;
- each relation: 1 if the entry's best object stands in the relation to the target entry's best object
  (GenEval's box rule), else 0;
- reward = min(1, named objects / detected objects) x mean of those credits: extra objects scale it down.

    type: shapes_scene
    params: {metadata: <world>/data/metadata.jsonl}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.errors import ConfigError, UserError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import require_file
from rewards.geneval import SOURCE, Clauses, Detection, read_metadata, relative_position
from rewards.shapes_detect import ShapesDetector, fill_of
from shapes.scenes import fill_ratio


@dataclass
class Config:
    """Params of `type: shapes_scene`."""

    metadata: str  # the world's metadata.jsonl (GenEval records)
    detector_args: dict[str, Any] = field(default_factory=dict)  # ShapesDetector fields
    shape_width: float = 0.25  # fill-ratio distance at which a shape's credit reaches 0
    position_threshold: float = 0.1  # GenEval POSITION_THRESHOLD

    def validate(self, where: str) -> None:
        if not self.shape_width > 0:
            raise ConfigError(f"{where}.shape_width: must be > 0, got {self.shape_width}")

    def files(self) -> list[RequiredFile]:
        return [RequiredFile("metadata", self.metadata, SOURCE, "jsonl: tag, include, exclude, prompt")]


def shape_credit(fill: float, shape: str, width: float = 0.25) -> float:
    """1 at `shape`'s ideal fill ratio, falling linearly to 0 at `width` away from it."""
    return max(0.0, 1.0 - abs(fill - fill_ratio(shape)) / width)


def scene_credit(clauses: Clauses, detections: list[Detection], width: float = 0.25,
                 position_threshold: float = 0.1) -> dict[str, float]:  # fmt: skip
    """Credits of one image: objects (mean over entries), relations (mean, or absent), discount, reward."""
    unused = list(detections)
    best: list[Detection | None] = []  # per include entry: its best object
    objects, relations = [], []
    for req in clauses.include:
        mine = sorted(((shape_credit(fill_of(d.mask, d.box), req.label, width), i) for i, d in enumerate(unused)
                       if req.color is None or d.color == req.color), reverse=True)[: req.count]  # fmt: skip
        credits = [c for c, _ in mine] + [0.0] * (req.count - len(mine))
        objects.append(sum(credits) / req.count)
        best.append(unused[mine[0][1]] if mine else None)
        for _, i in sorted(mine, key=lambda m: -m[1]):
            unused.pop(i)
        if req.position is not None:
            relation, target = req.position
            a, b = best[-1], best[target] if target < len(best) else None
            relations.append(float(a is not None and b is not None and
                                   relation in relative_position(a.box, b.box, position_threshold)))  # fmt: skip
    named = sum(req.count for req in clauses.include)
    discount = min(1.0, named / len(detections)) if detections else 1.0
    parts = objects + relations
    return {"objects": sum(objects) / len(objects), "relations": sum(relations) / len(relations) if relations else 1.0,
            "discount": discount, "reward": discount * sum(parts) / len(parts)}  # fmt: skip


class ShapesSceneReward:
    """The shaped scene reward of each image against its prompt's clauses."""

    name = "shapes_scene"

    def __init__(self, table: dict[str, Clauses], detector: ShapesDetector, config: Config):
        self.table, self.detector, self.config = table, detector, config

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise UserError(f"shapes_scene reward: prompt not in the metadata file: '{missing[0]}'")
        rows = [scene_credit(self.table[p], self.detector(im), self.config.shape_width, self.config.position_threshold)
                for im, p in zip(images, prompts)]  # fmt: skip
        column = {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in rows[0]}  # [B] each
        return RewardOutput(scores=column.pop("reward"), components=column)


def build(config: Config, device: torch.device, dtype: torch.dtype) -> ShapesSceneReward:
    """The reward: metadata table + the exact shapes detector."""
    table = read_metadata(require_file(config.metadata, "GenEval metadata", SOURCE))
    return ShapesSceneReward(table, ShapesDetector(**config.detector_args), config)
