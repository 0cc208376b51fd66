"""Exact pixel-level detector of the shapes world, for the GenEval clause engine (`rewards.geneval`).

Per image: every pixel gets the nearest palette colour (background included) if it lies within
`max_color_distance` of it (RGB Euclidean), else none (blurred edges, noise); each colour's mask is
split into 8-connected components; components smaller than `min_area` pixels are dropped; each kept
component is one object whose class comes from its fill ratio (area / bounding-box area: square ~1,
circle ~pi/4, triangle ~1/2). Confidence is 1: the rules are exact, partial credit comes from the
clause engine. Use from a rewards config:

    type: geneval
    params: {metadata: <world>/data/metadata.jsonl, detector: shapes}

(`shapes` is a built-in name of `rewards.geneval.BUILTIN_DETECTORS`; configs name detectors, never import paths.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from rewards.geneval import Detection
from shapes.scenes import BACKGROUND, COLORS

EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def nearest_color(image: np.ndarray, palette: np.ndarray, max_distance: float) -> np.ndarray:
    """image uint8 [H, W, 3], palette [P, 3] -> index map int [H, W]: nearest entry, -1 where farther than max."""
    diff = image[:, :, None, :].astype(np.float32) - palette[None, None].astype(np.float32)  # [H, W, P, 3]
    dist = np.sqrt((diff**2).sum(-1))  # [H, W, P]
    index = dist.argmin(-1)
    index[dist.min(-1) > max_distance] = -1
    return index


def fill_of(part: np.ndarray, box: tuple) -> float:
    """Area / bounding-box area of a component: mask [H, W] bool, box (x0, y0, x1, y1) exclusive ends."""
    return float(part.sum()) / max((box[2] - box[0]) * (box[3] - box[1]), 1)


def classify_fill(fill: float, square_above: float = 0.89, circle_above: float = 0.64) -> str:
    """Fill ratio of the bounding box -> shape: square ~1.0, circle ~0.785, triangle ~0.5 (cut at midpoints)."""
    if fill >= square_above:
        return "square"
    return "circle" if fill >= circle_above else "triangle"


def components(mask: np.ndarray, min_area: int) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """mask bool [H, W] -> (component mask [H, W], box (x0, y0, x1, y1) exclusive ends) of each 8-connected part."""
    labels, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        part = labels == i
        if part.sum() >= min_area:
            out.append((part, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
    return out


@dataclass
class ShapesDetector:
    """Colour masks -> connected components -> (shape, colour, box); implements rewards.geneval.Detector."""

    min_area: int = 30  # pixels; smaller specks are noise
    max_color_distance: float = 90.0  # RGB distance to the nearest palette colour, else the pixel is unassigned
    square_above: float = 0.89  # fill-ratio cuts between the ideal values 1.0 / 0.785 / 0.5
    circle_above: float = 0.64

    def __post_init__(self) -> None:
        self.names = list(COLORS)
        self.palette = np.array([COLORS[n] for n in self.names] + [BACKGROUND], dtype=np.uint8)  # [P+1, 3]

    def __call__(self, image: torch.Tensor) -> list[Detection]:
        """uint8 [3, H, W] RGB -> one Detection per coloured component."""
        pixels = image.permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
        index = nearest_color(pixels, self.palette, self.max_color_distance)
        found = []
        for c, name in enumerate(self.names):
            for part, box in components(index == c, self.min_area):
                shape = classify_fill(fill_of(part, box), self.square_above, self.circle_above)
                found.append(Detection(shape, tuple(float(v) for v in box), 1.0, name, part))
        return found
