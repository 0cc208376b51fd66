"""GenEval-style compositional reward (Ghosh et al. 2023, arXiv:2310.11513): rules over detections.

Two halves that never meet except through `Detection` lists:
- a `Detector` (any callable image -> detections; configured as an import path "module:factory") finds
  objects: label, box, confidence, and optionally a colour name and a mask. GenEval used Mask2Former +
  a CLIP colour classifier; no weights for those ship here, so the detector is pluggable;
- the clause engine (pure functions) checks a prompt's clauses from geneval_metadata.jsonl against them,
  following GenEval's evaluate_images.py: detections above the confidence threshold (0.9 for the
  counting tag, else 0.3), at most 16 per class, best first; for each `include` entry the `count`
  best objects of the class must exist, `count` of them must have the colour, and each must stand in
  the relation to every object matched by the referenced entry (box centres, offsets shrunk by 0.1 x
  the summed box sizes); each `exclude` entry needs fewer than `count` objects of its class.
Scores: strict = 1 if every clause holds (GenEval's accuracy), partial = fraction of clauses that hold.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from base_model.errors import ConfigError, UserError
from rewards.base import RequiredFile, RewardOutput, check_inputs
from rewards.common import require_file

SOURCE = "prompts/geneval_metadata.jsonl (github djghosh13/geneval, prompts/evaluation_metadata.jsonl)"


@dataclass(frozen=True)
class Detection:
    """One object a detector found."""

    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (y down); a point is a zero-size box
    score: float = 1.0  # detector confidence in [0, 1]
    color: str | None = None  # colour name, e.g. "red" (GenEval's 10 colours), if the detector knows it
    mask: np.ndarray | None = field(default=None, compare=False)  # [H, W] bool, optional, unused by the rules


class Detector(Protocol):
    """Anything that finds objects in one image."""

    def __call__(self, image: torch.Tensor) -> list[Detection]:
        """uint8 [3, H, W] RGB -> every object found."""
        ...


@dataclass(frozen=True)
class Requirement:
    """One `include` entry: at least `count` objects of `label`, maybe coloured, maybe placed."""

    label: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of the include entry it refers to)


@dataclass(frozen=True)
class Clauses:
    """A GenEval metadata record: what an image for `prompt` must show."""

    prompt: str
    tag: str
    include: tuple[Requirement, ...]
    exclude: tuple[tuple[str, int], ...] = ()  # (label, count): fewer than count objects

    @staticmethod
    def from_record(record: dict) -> Clauses:
        include = tuple(
            Requirement(r["class"], int(r["count"]), r.get("color"), tuple(r["position"]) if "position" in r else None)
            for r in record["include"]
        )
        exclude = tuple((r["class"], int(r["count"])) for r in record.get("exclude", []))
        return Clauses(record["prompt"], record["tag"], include, exclude)


@dataclass(frozen=True)
class Rules:
    """GenEval's evaluation constants."""

    confidence_threshold: float = 0.3  # GenEval THRESHOLD
    counting_threshold: float = 0.9  # GenEval COUNTING_THRESHOLD (tag "counting")
    max_objects_per_class: int = 16  # GenEval MAX_OBJECTS
    position_threshold: float = 0.1  # GenEval POSITION_THRESHOLD


def group_detections(detections: list[Detection], threshold: float, max_per_class: int) -> dict[str, list[Detection]]:
    """label -> detections above `threshold`, best first, at most `max_per_class`."""
    groups: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold and len(groups.setdefault(d.label, [])) < max_per_class:
            groups[d.label].append(d)
    return {k: v for k, v in groups.items() if v}


def relative_position(a: tuple, b: tuple, threshold: float = 0.1) -> set[str]:
    """Relations of box a to box b among left of / right of / above / below (GenEval's rule)."""
    ca, cb = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    dims = (abs(a[2] - a[0]) + abs(b[2] - b[0]), abs(a[3] - a[1]) + abs(b[3] - b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}  # fmt: skip


def check_clauses(clauses: Clauses, detections: list[Detection], rules: Rules = Rules()) -> dict[str, bool]:
    """Every clause of the prompt -> whether the detections satisfy it (insertion order = clause order)."""
    threshold = rules.counting_threshold if clauses.tag == "counting" else rules.confidence_threshold
    objects = group_detections(detections, threshold, rules.max_objects_per_class)
    results: dict[str, bool] = {}
    matched: list[list[Detection] | None] = []  # per include entry: its objects if all its clauses held
    for i, req in enumerate(clauses.include):
        found = objects.get(req.label, [])[: req.count]
        ok = results[f"{i}:count {req.label}>={req.count}"] = len(found) >= req.count
        if req.color is not None:
            colours = [d.color for d in found]
            results[f"{i}:color {req.color} {req.label}"] = ok = ok and colours.count(req.color) >= req.count
        if req.position is not None:
            relation, target = req.position
            anchors = matched[target] if target < len(matched) else None
            placed = ok and anchors is not None and all(
                relation in relative_position(d.box, t.box, rules.position_threshold) for d in found for t in anchors
            )  # fmt: skip
            results[f"{i}:{req.label} {relation} #{target}"] = ok = placed
        matched.append(found if ok else None)
    for label, count in clauses.exclude:
        results[f"exclude {label}<{count}"] = len(objects.get(label, [])) < count
    return results


def clause_scores(results: dict[str, bool]) -> tuple[float, float]:
    """(strict, partial): 1.0 iff all clauses hold; fraction of clauses that hold."""
    passed = sum(results.values())
    return float(passed == len(results)), passed / max(len(results), 1)


def read_metadata(path: str | Path) -> dict[str, Clauses]:
    """geneval_metadata.jsonl -> prompt -> Clauses; a bad line names file and line."""
    table: dict[str, Clauses] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            clauses = Clauses.from_record(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{n}: not a GenEval metadata record ({e})") from None
        table[clauses.prompt] = clauses
    return table


@dataclass
class Config:
    """Params of `type: geneval`."""

    metadata: str  # geneval_metadata.jsonl
    detector: str  # "package.module:factory"; factory(**detector_args) -> Detector
    detector_args: dict[str, Any] = field(default_factory=dict)
    score: Literal["strict", "partial"] = "strict"
    confidence_threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects_per_class: int = 16
    position_threshold: float = 0.1

    def validate(self, where: str) -> None:
        module, _, attr = self.detector.partition(":")
        if not module or not attr:
            raise ConfigError(f"{where}.detector: expected 'package.module:factory', got '{self.detector}'")

    def files(self) -> list[RequiredFile]:
        return [RequiredFile("metadata", self.metadata, SOURCE, "jsonl: tag, include, exclude, prompt")]

    def rules(self) -> Rules:
        return Rules(self.confidence_threshold, self.counting_threshold, self.max_objects_per_class,
                     self.position_threshold)  # fmt: skip


def load_detector(path: str, args: dict[str, Any]) -> Detector:
    """Import "module:factory" and call factory(**args)."""
    module, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"geneval detector '{path}' cannot be imported: {e}") from None
    return factory(**args)


class GenEvalReward:
    """Strict or partial GenEval score of each image against its prompt's clauses."""

    name = "geneval"

    def __init__(self, table: dict[str, Clauses], detector: Detector, rules: Rules, score: str):
        self.table, self.detector, self.rules, self.score = table, detector, rules, score

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise UserError(f"geneval reward: prompt not in the metadata file: '{missing[0]}'")
        pairs = [
            clause_scores(check_clauses(self.table[p], self.detector(im), self.rules)) for im, p in zip(images, prompts)
        ]
        strict = torch.tensor([s for s, _ in pairs], dtype=torch.float32)  # [B]
        partial = torch.tensor([p for _, p in pairs], dtype=torch.float32)  # [B]
        return RewardOutput(scores=strict if self.score == "strict" else partial,
                            components={"strict": strict, "partial": partial})  # fmt: skip


def build(cfg: Config, device: torch.device, dtype: torch.dtype) -> GenEvalReward:
    """The GenEval reward: metadata table + configured detector."""
    table = read_metadata(require_file(cfg.metadata, "GenEval metadata", SOURCE))
    return GenEvalReward(table, load_detector(cfg.detector, cfg.detector_args), cfg.rules(), cfg.score)
