"""The rule reward, configured as users do (`type: geneval`, shapes detector): right images 1, wrong ones lower."""

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from core.schema import from_dict
from rewards.base import RewardsConfig, build_reward
from shapes.scenes import COLORS, SHAPES, Placed, Scene, Spec, all_specs, caption, layout, render
from shapes.splits import write_metadata
from shapes.world import rewards_config

PAIR = Spec((("red", "circle"), ("blue", "square")), "left of")  # "a red circle on the left of a blue square"
TWO = Spec((("green", "triangle"), ("green", "triangle")))  # "two green triangles"


def _reward(tmp_path, score="strict"):
    metadata = write_metadata(all_specs(list(COLORS), list(SHAPES)), tmp_path / "metadata.jsonl")
    config = from_dict(RewardsConfig, rewards_config(metadata, score))
    return build_reward(config.rewards[0])


def _image(*objects: Placed) -> torch.Tensor:
    return torch.from_numpy(render(Scene(PAIR, objects))).permute(2, 0, 1)  # [3, 64, 64]


def test_right_image_scores_one_and_each_mistake_scores_lower(tmp_path):
    reward = _reward(tmp_path)
    right = _image(Placed("circle", "red", 16, 32, 18), Placed("square", "blue", 48, 32, 18))
    images = torch.stack([
        right,
        _image(Placed("circle", "green", 16, 32, 18), Placed("square", "blue", 48, 32, 18)),  # wrong colour
        _image(Placed("circle", "red", 48, 32, 18), Placed("square", "blue", 16, 32, 18)),  # wrong side
        _image(Placed("square", "blue", 48, 32, 18)),  # circle missing
        _image(Placed("circle", "red", 16, 32, 18)),  # square (the anchor) missing
    ])  # fmt: skip
    out = reward(images, [caption(PAIR)] * 5)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # clauses: square count, square colour, circle count, circle colour, circle left of square (needs the rest)
    assert out.components["partial"].tolist() == pytest.approx([1.0, 3 / 5, 4 / 5, 2 / 5, 2 / 5])


def test_counting_prompt_wants_exactly_two(tmp_path):
    reward = _reward(tmp_path, score="partial")
    rng = np.random.default_rng(0)
    two = torch.from_numpy(render(layout(TWO, rng))).permute(2, 0, 1)
    one = torch.from_numpy(render(layout(Spec((("green", "triangle"),)), rng))).permute(2, 0, 1)
    out = reward(torch.stack([two, one]), [caption(TWO)] * 2)
    assert out.components["strict"].tolist() == [1.0, 0.0]
    assert out.scores[0] == 1.0 and out.scores[1] < 1.0


def test_reward_config_errors_name_the_key(tmp_path):
    bad = rewards_config(tmp_path / "m.jsonl")
    bad["rewards"][0]["params"]["detector"] = "rewards.shapes_detect"  # no ':factory'
    with pytest.raises(ConfigError, match=r"params\.detector"):
        from_dict(RewardsConfig, bad)
