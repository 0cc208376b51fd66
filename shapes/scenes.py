"""The shapes world: what a caption says (`Spec`), where things are drawn (`Scene`), and the pixels.

A spec is one coloured shape ("a red circle"), two equal ones ("two green triangles", GenEval's
counting tag) or two different shapes in a relation ("a red circle on the left of a blue square",
GenEval's position tag plus colours). Every spec has a caption and a GenEval metadata record, so the
rule reward (`rewards.geneval` + `rewards.shapes_detect`) checks images against it. Layouts are drawn so the
relation holds by GenEval's own rule with a margin, and objects never touch: generator and detector
agree exactly on every rendered scene (tests/shapes).

`plan(scene)` is the short text a Self-CoT sample writes before its image ("2 shapes: red circle left,
blue square right"): the count, then each drawn object's colour, shape and 3x3 cell; `parse_plan` reads
it back and `plan_agrees` checks it against a caption's spec.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

# Well-separated RGB values (far apart in RGB and from the background); names are GenEval colours.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_WORDS = {"left of": "on the left of", "right of": "on the right of", "above": "above", "below": "below"}
KINDS: tuple[str, ...] = ("single", "counting", "position")


@dataclass(frozen=True)
class Spec:
    """What a caption says: objects (colour, shape) and, for two different shapes, a relation.

    single: one object; counting: two equal objects, no relation; position: objects[0] <relation> objects[1].
    """

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    @property
    def kind(self) -> str:
        if len(self.objects) == 1:
            return "single"
        return "counting" if self.relation is None else "position"


@dataclass(frozen=True)
class Placed:
    """One drawn object: shape, colour, bounding-box centre and side in pixels (y down)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """A spec and where its objects are drawn (same order as spec.objects)."""

    spec: Spec
    objects: tuple[Placed, ...]


# ---------------------------------------------------------------- specs, captions, records


def all_specs(colors: list[str], shapes: list[str]) -> list[Spec]:
    """Every spec of the world, in a fixed order: singles, counts, then position pairs of different shapes."""
    singles = [Spec(((c, s),)) for s in shapes for c in colors]
    counts = [Spec(((c, s), (c, s))) for s in shapes for c in colors]
    pairs = [
        Spec(((c1, s1), (c2, s2)), rel)
        for s1, s2 in itertools.permutations(shapes, 2)
        for c1, c2 in itertools.product(colors, colors)
        for rel in RELATIONS
    ]  # fmt: skip
    return singles + counts + pairs


def caption(spec: Spec) -> str:
    """'a red circle' / 'two green triangles' / 'a red circle on the left of a blue square'."""
    (c1, s1) = spec.objects[0]
    if spec.kind == "single":
        return f"a {c1} {s1}"
    if spec.kind == "counting":
        return f"two {c1} {s1}s"
    c2, s2 = spec.objects[1]
    return f"a {c1} {s1} {RELATION_WORDS[spec.relation]} a {c2} {s2}"


def record(spec: Spec) -> dict:
    """GenEval metadata record (tag, include, exclude, prompt) of a spec."""
    (c1, s1) = spec.objects[0]
    if spec.kind == "single":
        return {"tag": "colors", "include": [{"class": s1, "count": 1, "color": c1}], "prompt": caption(spec)}
    if spec.kind == "counting":
        return {"tag": "counting", "include": [{"class": s1, "count": 2, "color": c1}],
                "exclude": [{"class": s1, "count": 3}], "prompt": caption(spec)}  # fmt: skip
    c2, s2 = spec.objects[1]
    anchor = {"class": s2, "count": 1, "color": c2}
    include = [anchor, {"class": s1, "count": 1, "color": c1, "position": [spec.relation, 0]}]
    return {"tag": "position", "include": include, "prompt": caption(spec)}


def corrupt(spec: Spec, rng: np.random.Generator, colors: list[str]) -> Spec:
    """A wrong spec for the same image: one colour changed, or (position) the relation flipped."""
    if spec.kind == "position" and rng.random() < 0.5:
        return Spec(spec.objects, OPPOSITE[spec.relation])
    i = 0 if spec.kind != "position" else int(rng.integers(2))
    color, shape = spec.objects[i]
    new = str(rng.choice([c for c in colors if c != color]))
    objects = list(spec.objects)
    objects[i] = (new, shape)
    if spec.kind == "counting":
        objects = [(new, shape)] * 2
    return Spec(tuple(objects), spec.relation)


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Geometry:
    """Layout ranges in pixels for an image of side `image_size`."""

    image_size: int = 64
    min_size: float = 16.0  # object bounding-box side
    max_size: float = 22.0
    min_gap: float = 8.0  # empty pixels between two objects' boxes, at least
    pair_jitter: float = 3.0  # off-axis wobble of each object of a related pair


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def layout(spec: Spec, rng: np.random.Generator, geo: Geometry = Geometry()) -> Scene:
    """Draw positions and sizes for the spec's objects (relations hold with a margin, boxes never touch)."""
    sizes = [_uniform(rng, geo.min_size, geo.max_size) for _ in spec.objects]
    n = geo.image_size
    if spec.kind == "single":
        half = sizes[0] / 2 + 1
        centres = [(_uniform(rng, half, n - half), _uniform(rng, half, n - half))]
    elif spec.kind == "counting":
        centres = _apart(rng, sizes, geo)
    else:
        centres = _related(rng, sizes, spec.relation, geo)
    placed = tuple(Placed(s, c, x, y, size) for (c, s), (x, y), size in zip(spec.objects, centres, sizes))
    return Scene(spec, placed)


def _apart(rng: np.random.Generator, sizes: list[float], geo: Geometry) -> list[tuple[float, float]]:
    """Two centres anywhere whose boxes are at least min_gap apart along x or y (rejection sampling)."""
    n = geo.image_size
    while True:
        pts = [(_uniform(rng, s / 2 + 1, n - s / 2 - 1), _uniform(rng, s / 2 + 1, n - s / 2 - 1)) for s in sizes]
        need = (sizes[0] + sizes[1]) / 2 + geo.min_gap
        if max(abs(pts[0][0] - pts[1][0]), abs(pts[0][1] - pts[1][1])) >= need:
            return pts


def _related(rng: np.random.Generator, sizes: list[float], relation: str, geo: Geometry) -> list[tuple[float, float]]:
    """Centres of objects 0 and 1 with object 0 `relation` object 1 along one axis, nearly aligned on the other."""
    n = geo.image_size
    half0, half1 = sizes[0] / 2, sizes[1] / 2
    gap = _uniform(rng, geo.min_gap, geo.min_gap + 6)
    span = half0 + gap + half1  # centre distance along the axis
    lo = half0 + 1 if relation in ("left of", "above") else half1 + 1
    first = _uniform(rng, lo, n - 1 - (span + (half1 if relation in ("left of", "above") else half0)))
    a, b = (first, first + span) if relation in ("left of", "above") else (first + span, first)
    margin = max(half0, half1) + 1 + geo.pair_jitter
    across = _uniform(rng, margin, n - margin)
    j0, j1 = (_uniform(rng, -geo.pair_jitter, geo.pair_jitter) for _ in range(2))
    if relation in ("left of", "right of"):
        return [(a, across + j0), (b, across + j1)]
    return [(across + j0, a), (across + j1, b)]


# ---------------------------------------------------------------- plans (the Self-CoT text channel)

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
COUNT_WORDS = {1: "1 shape", 2: "2 shapes"}


def cell(cx: float, cy: float, image_size: int = 64) -> tuple[int, int]:
    """(row, column) in 0..2 of the 3x3 cell holding a point (thirds of the image, y down)."""
    third = image_size / 3
    return min(int(cy // third), 2), min(int(cx // third), 2)


def cell_words(row: int, col: int) -> str:
    """'top left', 'top', 'left', 'centre', ... : the middle row and centre column go unsaid."""
    if (row, col) == (1, 1):
        return "centre"
    return " ".join(w for w, skip in ((ROWS[row], row == 1), (COLUMNS[col], col == 1)) if not skip)


CELLS: dict[str, tuple[int, int]] = {cell_words(r, c): (r, c) for r in range(3) for c in range(3)}


def plan(scene: Scene, image_size: int = 64) -> str:
    """'2 shapes: red circle left, blue square right': the count, then each drawn object's colour, shape
    and cell. Objects keep the caption's order; two equal objects (counting) go in reading order."""
    objects = list(scene.objects)
    if scene.spec.kind == "counting":
        objects.sort(key=lambda o: (cell(o.cx, o.cy, image_size), o.cx, o.cy))
    parts = [f"{o.color} {o.shape} {cell_words(*cell(o.cx, o.cy, image_size))}" for o in objects]
    return f"{COUNT_WORDS[len(objects)]}: " + ", ".join(parts)


def parse_plan(text: str) -> list[tuple[str, str, tuple[int, int]]] | None:
    """A plan's objects as (colour, shape, (row, column)); None unless it is well-formed (`plan`'s grammar,
    any colour and shape name of the world, the count matching the objects listed)."""
    head, sep, body = text.strip().partition(": ")
    count = {v: k for k, v in COUNT_WORDS.items()}.get(head)
    if not sep or count is None:
        return None
    out = []
    for part in body.split(", "):
        words = part.split(" ", 2)
        if len(words) != 3 or words[0] not in COLORS or words[1] not in SHAPES or words[2] not in CELLS:
            return None
        out.append((words[0], words[1], CELLS[words[2]]))
    return out if len(out) == count else None


def relation_holds(first: tuple[int, int], second: tuple[int, int], relation: str) -> bool:
    """Cell `first` is `relation` cell `second` (a strictly smaller / larger column or row)."""
    (r0, c0), (r1, c1) = first, second
    return {"left of": c0 < c1, "right of": c0 > c1, "above": r0 < r1, "below": r0 > r1}[relation]


def plan_agrees(text: str, spec: Spec) -> bool:
    """The plan is well-formed and drawable for the caption: same count, colours and shapes (in the
    caption's order), two objects in different cells, and a position caption's relation between the cells."""
    objects = parse_plan(text)
    if objects is None or [(c, s) for c, s, _ in objects] != list(spec.objects):
        return False
    if len(objects) == 2 and objects[0][2] == objects[1][2]:
        return False
    return spec.relation is None or relation_holds(objects[0][2], objects[1][2], spec.relation)


# ---------------------------------------------------------------- pixels


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int) -> np.ndarray:
    """[H, W] bool: pixel centres inside the shape (circle, axis-aligned square, upright isosceles triangle)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    h = size / 2
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":  # apex at the top centre, base at the bottom: half-width grows from 0 to h
        top = cy - h
        return (yy >= top) & (yy <= cy + h) & (np.abs(xx - cx) <= (yy - top) / 2)
    raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Scene -> uint8 [H, W, 3] RGB on the white background (crisp edges, no anti-aliasing)."""
    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        img[shape_mask(obj.shape, obj.cx, obj.cy, obj.size, image_size)] = COLORS[obj.color]
    return img


def fill_ratio(shape: str) -> float:
    """Area / bounding-box area of an ideal shape: circle pi/4, square 1, triangle 1/2."""
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape]
