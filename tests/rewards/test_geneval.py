"""GenEval clause engine on hand-made detections, and the reward wired to a pluggable detector."""

import json
from pathlib import Path

import pytest
import torch

from base_model.errors import ConfigError, UserError
from base_model.schema import from_dict
from rewards.geneval import (
    Clauses,
    Config,
    Detection,
    build,
    check_clauses,
    clause_scores,
    read_metadata,
    relative_position,
)
from tests.rewards.helpers import random_images

METADATA = Path(__file__).resolve().parents[2] / "prompts" / "geneval_metadata.jsonl"  # shipped in the repository


def det(label, x0, y0, x1, y1, score=0.95, color=None):
    return Detection(label, (x0, y0, x1, y1), score, color)


def test_relative_position_follows_geneval():
    a, b = (60, 10, 80, 30), (10, 10, 30, 30)  # a's centre is 50 px right of b's, same height
    assert relative_position(a, b) == {"right of"} and relative_position(b, a) == {"left of"}
    assert relative_position((10, 60, 30, 80), (10, 10, 30, 30)) == {"below"}  # y grows downwards
    assert relative_position((50, 0, 70, 20), (10, 50, 30, 70)) == {"right of", "above"}  # diagonal
    # offsets smaller than 0.1 x the summed box sizes vanish: 2 px apart, boxes 20 + 20 wide -> none
    assert relative_position((12, 10, 32, 30), (10, 10, 30, 30)) == set()


def test_two_objects_colours_and_exclusions():
    include = [{"class": "wine glass", "count": 1, "color": "purple"}, {"class": "apple", "count": 1, "color": "black"}]
    clauses = Clauses.from_record({"prompt": "p", "tag": "color_attr", "include": include})
    good = [det("wine glass", 0, 0, 10, 10, color="purple"), det("apple", 20, 0, 30, 10, color="black")]
    results = check_clauses(clauses, good)
    assert list(results) == ["0:count wine glass>=1", "0:color purple wine glass", "1:count apple>=1",
                             "1:color black apple"] and all(results.values())  # fmt: skip
    assert clause_scores(results) == (1.0, 1.0)
    wrong_colour = [good[0], det("apple", 20, 0, 30, 10, color="red")]
    assert clause_scores(check_clauses(clauses, wrong_colour)) == (0.0, 0.75)
    assert clause_scores(check_clauses(clauses, good[:1])) == (0.0, 0.5)  # no apple: count and colour fail


def test_counting_uses_the_high_threshold_and_the_exclusion():
    clauses = Clauses.from_record(
        {"tag": "counting", "prompt": "a photo of two clocks",
         "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    )  # fmt: skip
    two = [det("clock", 0, 0, 5, 5), det("clock", 10, 0, 15, 5)]
    assert clause_scores(check_clauses(clauses, two)) == (1.0, 1.0)
    assert clause_scores(check_clauses(clauses, two + [det("clock", 20, 0, 25, 5)])) == (0.0, 0.5)  # three
    # a third clock below the 0.9 counting threshold is not counted
    assert clause_scores(check_clauses(clauses, two + [det("clock", 20, 0, 25, 5, score=0.5)])) == (1.0, 1.0)
    assert clause_scores(check_clauses(clauses, two[:1])) == (0.0, 0.5)


def test_position_refers_to_the_objects_matched_by_an_earlier_entry():
    clauses = Clauses.from_record({"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
                                   "include": [{"class": "teddy bear", "count": 1},
                                               {"class": "dog", "count": 1, "position": ["right of", 0]}]})  # fmt: skip
    bear = det("teddy bear", 0, 0, 20, 20)
    assert clause_scores(check_clauses(clauses, [bear, det("dog", 60, 0, 80, 20)])) == (1.0, 1.0)
    assert clause_scores(check_clauses(clauses, [bear, det("dog", 0, 60, 20, 80)])) == (0.0, 2 / 3)  # below
    assert clause_scores(check_clauses(clauses, [det("dog", 60, 0, 80, 20)])) == (0.0, 1 / 3)  # no anchor
    low_confidence_bear = det("teddy bear", 0, 0, 20, 20, score=0.2)  # under GenEval's 0.3
    assert clause_scores(check_clauses(clauses, [low_confidence_bear, det("dog", 60, 0, 80, 20)]))[0] == 0.0


def test_metadata_file_parses_every_tag():
    table = read_metadata(METADATA)
    assert len(table) == 553
    assert {c.tag for c in table.values()} == {"single_object", "two_object", "counting", "colors", "position",
                                               "color_attr"}  # fmt: skip
    dog = table["a photo of a dog right of a teddy bear"]
    assert dog.include[1].position == ("right of", 0)


class ScriptedDetector:
    """Returns the same detections for every image (stands in for a real detector)."""

    def __init__(self, detections: list[dict]):
        self.detections = [
            Detection(d["label"], tuple(d["box"]), d.get("score", 1.0), d.get("color")) for d in detections
        ]

    def __call__(self, image: torch.Tensor) -> list[Detection]:
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        return list(self.detections)


def test_reward_with_a_pluggable_detector(tmp_path):
    records = [{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
               {"tag": "counting", "include": [{"class": "cow", "count": 2}], "exclude": [{"class": "cow", "count": 3}],
                "prompt": "a photo of two cows"}]  # fmt: skip
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    detections = [{"label": "cow", "box": [0, 0, 10, 10]}]
    params = {"metadata": str(path), "detector": "tests.rewards.test_geneval:ScriptedDetector",
              "detector_args": {"detections": detections}, "score": "partial"}  # fmt: skip
    reward = build(from_dict(Config, params, "r"), torch.device("cpu"), torch.float32)
    out = reward(random_images(2), ["a photo of a cow", "a photo of two cows"])
    torch.testing.assert_close(out.components["strict"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.5]))
    with pytest.raises(UserError, match="not in the metadata"):
        reward(random_images(1), ["a photo of a horse"])
    with pytest.raises(ConfigError, match="module:factory"):
        from_dict(Config, {**params, "detector": "no_colon"}, "r")
