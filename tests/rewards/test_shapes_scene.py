"""The shaped scene reward (rewards/shapes_scene.py) on hand-made detections and on rendered scenes."""

import json

import numpy as np
import pytest
import torch

from rewards.base import RewardSpec, build_reward
from rewards.geneval import Clauses, Detection
from rewards.shapes_scene import scene_credit, shape_credit
from shapes.scenes import Spec, caption, layout, record, render

PAIR = Clauses.from_record(record(Spec((("red", "circle"), ("blue", "square")), "left of")))


def component(color: str, x0: int, y0: int, side: int, pixels: int) -> Detection:
    """A component with a side x side box whose mask holds `pixels` pixels (fill = pixels / side^2)."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side].flat[:pixels] = True
    return Detection("?", (x0, y0, x0 + side, y0 + side), 1.0, color, mask)


def test_shape_credit_by_hand():
    assert shape_credit(1.0, "square") == 1.0 and shape_credit(0.5, "triangle") == 1.0
    assert shape_credit(0.9, "square") == pytest.approx(0.6)  # 0.1 away from 1.0, width 0.25
    assert shape_credit(0.8, "circle") == pytest.approx(1 - (0.8 - np.pi / 4) / 0.25)
    assert shape_credit(0.5, "square") == 0.0


def test_scene_credit_by_hand():
    square, circle = component("blue", 40, 0, 10, 100), component("red", 0, 0, 10, 80)  # fills 1.0, 0.8
    c = 1 - (0.8 - np.pi / 4) / 0.25
    got = scene_credit(PAIR, [square, circle])
    assert got["objects"] == pytest.approx((1 + c) / 2) and got["relations"] == 1.0 and got["discount"] == 1.0
    assert got["reward"] == pytest.approx((1 + c + 1) / 3)
    # a stray green component: the same credits, scaled by 2 named / 3 detected
    assert scene_credit(PAIR, [square, circle, component("green", 20, 40, 10, 50)])["reward"] == pytest.approx(
        2 / 3 * (1 + c + 1) / 3
    )
    # the red circle drawn right of the square: relation fails
    assert scene_credit(PAIR, [square, component("red", 50, 30, 10, 80)])["reward"] == pytest.approx((1 + c) / 3)
    # no blue object: that object and the relation get nothing
    assert scene_credit(PAIR, [circle])["reward"] == pytest.approx(c / 3)
    assert scene_credit(PAIR, [])["reward"] == 0.0


def test_counting_uses_distinct_objects():
    two = Clauses.from_record(record(Spec((("green", "triangle"), ("green", "triangle")))))
    one = component("green", 0, 0, 10, 50)  # fill 0.5: an ideal triangle
    assert scene_credit(two, [one])["reward"] == pytest.approx(0.5)  # the second triangle is missing
    assert scene_credit(two, [one, component("green", 30, 30, 10, 50)])["reward"] == pytest.approx(1.0)


def test_rendered_scenes_score_high_and_wrong_prompts_lower(tmp_path):
    spec = Spec((("red", "circle"), ("blue", "square")), "left of")
    swapped = Spec((("blue", "circle"), ("red", "square")), "left of")
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(json.dumps(record(s)) for s in (spec, swapped)) + "\n")
    reward = build_reward(RewardSpec("s", "shapes_scene", params={"metadata": str(path)}))
    images = torch.stack([torch.from_numpy(render(layout(spec, np.random.default_rng(i)))).permute(2, 0, 1)
                          for i in range(8)])  # fmt: skip
    right = reward(images, [caption(spec)] * 8).scores
    wrong = reward(images, [caption(swapped)] * 8).scores
    assert right.min() > 0.85 and (wrong < right).all()
