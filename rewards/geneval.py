"""GenEval-style compositional reward (Ghosh et al. 2023, arXiv:2310.11513): rules over detections.

Two halves that never meet except through `Detection` lists:
- a `Detector` (any callable image -> detections; configured by name, see Trust below) finds objects:
  label, box, confidence, and optionally a colour name and a mask. GenEval used Mask2Former + a CLIP
  colour classifier; no weights for those ship here, so the detector is pluggable;
- the clause engine (pure functions) checks a prompt's clauses from geneval_metadata.jsonl against them,
  following GenEval's evaluate_images.py: detections above the confidence threshold (0.9 for the
  counting tag, else 0.3), at most 16 per class, best first; for each `include` entry the `count`
  best objects of the class must exist, `count` of them must have the colour, and each must stand in
  the relation to every object matched by the referenced entry (box centres, offsets shrunk by 0.1 x
  the summed box sizes); each `exclude` entry needs fewer than `count` objects of its class.
Scores: strict = 1 if every clause holds (GenEval's accuracy), partial = fraction of clauses that hold.

Trust: a rewards config is data, and may come from anyone (a shared YAML, an override on the command line).
`params.detector` therefore only *names* a detector: one built in here (`BUILTIN_DETECTORS`), or one that
an installed package declares under the entry-point group `nextstep_align.geneval_detectors` (installing a
package already trusts its code; a config never names code to import). An unknown name fails config
validation (`nsalign rewards check` exits 2 with one line listing the known names). `detector_args` are
plain YAML values passed as keyword arguments to the chosen factory. A plug-in declares, in its
pyproject.toml:

    [project.entry-points."nextstep_align.geneval_detectors"]
    mask2former = "my_package.detect:build_detector"   # factory(**detector_args) -> Detector
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from core.errors import ConfigError, UserError
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
    """label -> detections above `threshold`, best first, at most `max_per_class`.

    Order as GenEval's `np.argsort(scores)[::-1]`: ascending (ties in detector order), then reversed,
    so of two equally confident detections the later one comes first.
    """
    groups: dict[str, list[Detection]] = {}
    for d in reversed(sorted(detections, key=lambda d: d.score)):
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
    detector: str  # a name from `known_detectors()`, e.g. "shapes"; its factory(**detector_args) -> Detector
    detector_args: dict[str, Any] = field(default_factory=dict)
    score: Literal["strict", "partial"] = "strict"
    confidence_threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects_per_class: int = 16
    position_threshold: float = 0.1

    def validate(self, where: str) -> None:
        detector_name(self.detector, f"{where}.detector")  # a look-up: nothing is imported

    def files(self) -> list[RequiredFile]:
        return [RequiredFile("metadata", self.metadata, SOURCE, "jsonl: tag, include, exclude, prompt")]

    def rules(self) -> Rules:
        return Rules(self.confidence_threshold, self.counting_threshold, self.max_objects_per_class,
                     self.position_threshold)  # fmt: skip


DETECTOR_ENTRY_POINTS = "nextstep_align.geneval_detectors"  # the entry-point group of detector plug-ins


def _shapes() -> Callable[..., Detector]:
    from rewards.shapes_detect import ShapesDetector  # imported on use: rewards.shapes_detect imports this module

    return ShapesDetector


# Detectors of this package: the name a config gives -> a function returning the factory (importing it only
# then). Plug-ins cannot replace them (a plug-in declaring one of these names is ignored).
BUILTIN_DETECTORS: dict[str, Callable[[], Callable[..., Detector]]] = {"shapes": _shapes}

# The import paths configs used to give before detectors were named (rewards.yaml files written by
# `nsalign shapes-world` up to then say "shapes.detect:ShapesDetector"): a fixed table, never imported.
LEGACY_DETECTOR_NAMES = {"shapes.detect:ShapesDetector": "shapes", "shapes.detect:shapes_detector": "shapes"}


def plugin_detectors() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed packages' detectors: name -> entry point (not loaded yet), built-in names left out."""
    found = importlib.metadata.entry_points(group=DETECTOR_ENTRY_POINTS)
    return {ep.name: ep for ep in found if ep.name not in BUILTIN_DETECTORS}


def known_detectors() -> list[str]:
    """Every name `params.detector` may take: built-ins first, then installed plug-ins."""
    return [*BUILTIN_DETECTORS, *sorted(plugin_detectors())]


def detector_name(name: str, where: str = "geneval detector") -> str:
    """The registered name `name` stands for (itself, or the name of a legacy path); an unknown name is a
    ConfigError listing the known ones. Looks names up only: nothing is imported."""
    name = LEGACY_DETECTOR_NAMES.get(name, name)
    if name not in BUILTIN_DETECTORS and name not in plugin_detectors():
        raise ConfigError(
            f"{where}: unknown detector {name!r} (known: {', '.join(known_detectors())}; plug-ins register "
            f"under the entry-point group {DETECTOR_ENTRY_POINTS})"
        )
    return name


def load_detector(name: str, args: dict[str, Any]) -> Detector:
    """The detector registered under `name` (a built-in, or a plug-in's entry point, loaded now), built
    with factory(**args). Never imports a path taken from the config."""
    name = detector_name(name)
    if name in BUILTIN_DETECTORS:
        factory = BUILTIN_DETECTORS[name]()
    else:
        entry = plugin_detectors()[name]
        try:
            factory = entry.load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"geneval detector plug-in {name!r} ({entry.value}) cannot be loaded: {e}") from None
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as e:  # an unknown or missing keyword
        raise ConfigError(f"geneval detector {name!r}: detector_args do not fit it ({e})") from None
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


def build(config: Config, device: torch.device, dtype: torch.dtype) -> GenEvalReward:
    """The GenEval reward: metadata table + configured detector."""
    table = read_metadata(require_file(config.metadata, "GenEval metadata", SOURCE))
    return GenEvalReward(table, load_detector(config.detector, config.detector_args), config.rules(), config.score)
