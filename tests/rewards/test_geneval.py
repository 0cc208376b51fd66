"""GenEval clause engine on hand-made detections, and the reward wired to a pluggable detector."""

import json
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, UserError
from core.schema import from_dict
from rewards.geneval import (
    Clauses,
    Config,
    Detection,
    build,
    check_clauses,
    clause_scores,
    group_detections,
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


def test_reward_with_a_pluggable_detector(tmp_path, monkeypatch):
    # a plug-in: an installed package declares its factory under the entry-point group; configs name it
    from importlib.metadata import EntryPoint

    import rewards.geneval as geneval

    plugin = EntryPoint("scripted", "tests.rewards.test_geneval:ScriptedDetector", geneval.DETECTOR_ENTRY_POINTS)
    monkeypatch.setattr(geneval.importlib.metadata, "entry_points", lambda group: [plugin] * (group == plugin.group))
    records = [{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
               {"tag": "counting", "include": [{"class": "cow", "count": 2}], "exclude": [{"class": "cow", "count": 3}],
                "prompt": "a photo of two cows"}]  # fmt: skip
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    detections = [{"label": "cow", "box": [0, 0, 10, 10]}]
    params = {"metadata": str(path), "detector": "scripted", "detector_args": {"detections": detections},
              "score": "partial"}  # fmt: skip
    reward = build(from_dict(Config, params, "r"), torch.device("cpu"), torch.float32)
    out = reward(random_images(2), ["a photo of a cow", "a photo of two cows"])
    torch.testing.assert_close(out.components["strict"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.5]))
    with pytest.raises(UserError, match="not in the metadata"):
        reward(random_images(1), ["a photo of a horse"])
    path = "tests.rewards.test_geneval:ScriptedDetector"  # the plug-in's own import path: configs never give paths
    with pytest.raises(ConfigError, match=r"r\.detector: unknown detector .*known: shapes, scripted"):
        from_dict(Config, {**params, "detector": path}, "r")
    with pytest.raises(ConfigError, match="detector_args do not fit"):
        build(from_dict(Config, {**params, "detector_args": {"boxes": []}}, "r"), torch.device("cpu"), torch.float32)


def test_equally_confident_detections_keep_genevals_reversed_argsort_order():
    """GenEval orders by np.argsort(scores)[::-1]: for a tie the later detection comes first. Two cats at
    0.8, red then blue: the best single cat is the blue one, so "a blue cat" holds and "a red cat" fails."""
    red, blue = det("cat", 0, 0, 10, 10, score=0.8, color="red"), det("cat", 20, 0, 30, 10, score=0.8, color="blue")
    sure = det("cat", 40, 0, 50, 10, score=0.9, color="green")
    assert group_detections([red, blue, sure], 0.3, 16) == {"cat": [sure, blue, red]}
    for colour, ok in (("blue", True), ("red", False)):
        clauses = Clauses.from_record({"prompt": "p", "tag": "color_attr",
                                       "include": [{"class": "cat", "count": 1, "color": colour}]})  # fmt: skip
        assert clause_scores(check_clauses(clauses, [red, blue]))[0] == float(ok)


def test_score_thresholds_are_strict_and_at_most_16_objects_per_class():
    """GenEval keeps scores > 0.3 (> 0.9 for counting): exactly 0.3 or 0.9 is dropped. At most 16 per class:
    17 confident clocks satisfy "at least 16" but not "at least 17", and "fewer than 17" holds."""
    assert group_detections([det("cat", 0, 0, 1, 1, score=0.3)], 0.3, 16) == {}
    assert len(group_detections([det("cat", 0, 0, 1, 1, score=0.30001)], 0.3, 16)["cat"]) == 1
    counting = Clauses.from_record({"tag": "counting", "prompt": "p", "include": [{"class": "clock", "count": 1}]})
    assert clause_scores(check_clauses(counting, [det("clock", 0, 0, 5, 5, score=0.9)]))[0] == 0.0
    clocks = [det("clock", 10 * i, 0, 10 * i + 5, 5) for i in range(17)]
    for count, ok in ((16, True), (17, False)):
        clauses = Clauses.from_record({"tag": "single_object", "prompt": "p",
                                       "include": [{"class": "clock", "count": count}]})  # fmt: skip
        assert clause_scores(check_clauses(clauses, clocks))[0] == float(ok)
    excl = Clauses.from_record({"tag": "single_object", "prompt": "p", "include": [{"class": "clock", "count": 1}],
                                "exclude": [{"class": "clock", "count": 17}]})  # fmt: skip
    assert clause_scores(check_clauses(excl, clocks))[0] == 1.0


def test_position_threshold_is_a_tenth_of_the_summed_box_sizes():
    """Boxes 20 px wide (summed 40 -> 0.1 x 40 = 4 px shrink), same height. Centres 10 px apart: revised
    dx = (10 - 4) / 10 = 0.6 > 0.5 -> "right of"; 5 px apart: (5 - 4) / 5 = 0.2 -> no relation. Both hold
    only for thresholds in [0.0625, 0.125), so the default 0.1 is pinned end to end through the rules."""
    clauses = Clauses.from_record({"tag": "position", "prompt": "p",
                                   "include": [{"class": "teddy bear", "count": 1},
                                               {"class": "dog", "count": 1, "position": ["right of", 0]}]})  # fmt: skip
    bear = det("teddy bear", 10, 10, 30, 30)
    assert clause_scores(check_clauses(clauses, [bear, det("dog", 20, 10, 40, 30)]))[0] == 1.0
    assert clause_scores(check_clauses(clauses, [bear, det("dog", 15, 10, 35, 30)]))[0] == 0.0
