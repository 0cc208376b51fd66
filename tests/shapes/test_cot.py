"""The shapes world's text channel: plans by hand, their parser and checker, the plans split."""

import pyarrow.parquet as pq
import pytest

from alignment.sft_data import SftDataConfig, load_samples
from core.errors import UserError
from shapes.scenes import CELLS, Placed, Scene, Spec, caption, cell, cell_words, parse_plan, plan, plan_agrees
from shapes.splits import WorldDataConfig, image_split, partition, prompt_split, write_parquet

RED_LEFT_OF_BLUE = Spec((("red", "circle"), ("blue", "square")), "left of")


def test_plan_reads_count_colour_shape_and_cell_from_the_drawing():
    # 64 px in thirds: columns [0, 21.33) left, [21.33, 42.67) centre, [42.67, 64) right; rows the same, y down
    pair = Scene(RED_LEFT_OF_BLUE, (Placed("circle", "red", 15, 30, 18), Placed("square", "blue", 50, 34, 18)))
    assert plan(pair) == "2 shapes: red circle left, blue square right"
    single = Scene(Spec((("green", "triangle"),)), (Placed("triangle", "green", 32, 10, 16),))
    assert plan(single) == "1 shape: green triangle top"
    # counting: the two equal objects in reading order, whatever order the layout drew them in
    two = Spec((("yellow", "square"),) * 2)
    counting = Scene(two, (Placed("square", "yellow", 50, 50, 16), Placed("square", "yellow", 10, 10, 16)))
    assert plan(counting) == "2 shapes: yellow square top left, yellow square bottom right"
    # position pairs keep the caption's order even when it is not the reading order
    below = Spec((("red", "circle"), ("blue", "square")), "below")
    assert plan(Scene(below, (Placed("circle", "red", 32, 55, 16), Placed("square", "blue", 32, 20, 16)))) == (
        "2 shapes: red circle bottom, blue square top"
    )


def test_cells_and_their_words():
    assert cell(21.3, 42.7) == (2, 0) and cell(21.4, 21.4) == (1, 1) and cell(63.9, 0.0) == (0, 2)
    words = [cell_words(r, c) for r in range(3) for c in range(3)]
    assert words == ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
    assert all(CELLS[w] == divmod(i, 3) for i, w in enumerate(words))


def test_parse_plan_accepts_only_the_grammar():
    assert parse_plan("2 shapes: red circle left, blue square top right") == [
        ("red", "circle", (1, 0)),
        ("blue", "square", (0, 2)),
    ]
    assert parse_plan(" 1 shape: green triangle centre ") == [("green", "triangle", (1, 1))]
    for bad in ["", "1 shape:", "2 shapes: red circle left", "1 shape: red circle left, red circle right",
                "1 shape: purple circle left", "1 shape: red hexagon left", "1 shape: red circle middle",
                "3 shapes: red circle left", "1 shapes: red circle left", "1 shape red circle left"]:  # fmt: skip
        assert parse_plan(bad) is None, bad


def test_plan_agrees_checks_count_colours_shapes_cells_and_relation():
    assert plan_agrees("2 shapes: red circle left, blue square right", RED_LEFT_OF_BLUE)
    assert plan_agrees("2 shapes: red circle top left, blue square bottom", RED_LEFT_OF_BLUE)  # column 0 < 1
    assert not plan_agrees("2 shapes: red circle top, blue square bottom", RED_LEFT_OF_BLUE)  # same column
    assert not plan_agrees("2 shapes: red circle right, blue square left", RED_LEFT_OF_BLUE)  # relation flipped
    assert not plan_agrees("2 shapes: blue square right, red circle left", RED_LEFT_OF_BLUE)  # caption order
    assert not plan_agrees("2 shapes: red circle left, green square right", RED_LEFT_OF_BLUE)  # colour
    assert not plan_agrees("1 shape: red circle left", RED_LEFT_OF_BLUE)  # count
    two = Spec((("red", "triangle"),) * 2)
    assert plan_agrees("2 shapes: red triangle top, red triangle bottom", two)
    assert not plan_agrees("2 shapes: red triangle top, red triangle top", two)  # one cell cannot hold both
    assert plan_agrees("1 shape: red triangle centre", Spec((("red", "triangle"),)))


def test_every_drawn_scene_has_a_plan_that_agrees_with_its_caption():
    config = WorldDataConfig(num_cot=400)
    rows = image_split(config, "cot")
    assert all(plan_agrees(plan(r.scene), r.spec) for r in rows)
    assert [c for _, _, c in parse_plan(plan(rows[0].scene))] == [cell(o.cx, o.cy) for o in rows[0].scene.objects]


def test_the_plans_split_is_clean_train_pool_and_leaves_the_other_splits_alone():
    config = WorldDataConfig(num_sft=50, num_cot=300, num_eval=40)
    held_out = {caption(s) for kind in partition(config)["eval"].values() for s in kind}
    cot = image_split(config, "cot")
    assert len(cot) == 300 and not held_out & {r.caption for r in cot} and not any(r.noisy for r in cot)
    assert {r.caption for r in prompt_split(config, "eval")} <= held_out
    assert {r.spec.kind for r in cot} == {"single", "counting", "position"}
    sft = image_split(config, "sft")
    assert [r.scene for r in cot[:50]] != [r.scene for r in sft]  # its own random stream
    fewer = WorldDataConfig(num_sft=50, num_cot=7, num_eval=40)
    assert [(r.caption, r.scene) for r in image_split(fewer, "sft")] == [(r.caption, r.scene) for r in sft]


def test_plans_column_is_what_sft_reads_as_reasoning(tmp_path):
    rows = image_split(WorldDataConfig(num_cot=5), "cot")
    path = write_parquet(rows, tmp_path / "cot.parquet", plans=True)
    assert pq.read_table(path).column("plan").to_pylist() == [plan(r.scene) for r in rows]
    samples = load_samples(SftDataConfig(path=str(path), reasoning_field="plan"))
    assert samples.reasonings == [plan(r.scene) for r in rows] and samples.captions == [r.caption for r in rows]
    assert load_samples(SftDataConfig(path=str(path))).reasonings is None
    assert "plan" not in pq.read_table(write_parquet(rows, tmp_path / "plain.parquet")).column_names


def test_missing_reasoning_column_is_one_line(tmp_path):
    path = write_parquet(image_split(WorldDataConfig(num_cot=2), "cot"), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="no column 'plan'"):
        load_samples(SftDataConfig(path=str(path), reasoning_field="plan"))
