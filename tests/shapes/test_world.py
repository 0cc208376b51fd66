"""The shapes world: generator and detector agree exactly; captions, records and splits are what they claim."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rewards.geneval import Clauses, check_clauses, clause_scores, relative_position
from rewards.shapes_detect import ShapesDetector, classify_fill
from shapes.scenes import COLORS, SHAPES, Spec, all_specs, caption, corrupt, layout, record, render, shape_mask
from shapes.splits import WorldDataConfig, image_split, partition, prompt_split, write_metadata, write_parquet

SPECS = all_specs(list(COLORS), list(SHAPES))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


def test_captions_and_records_by_hand():
    pair = Spec((("red", "circle"), ("blue", "square")), "left of")
    assert caption(pair) == "a red circle on the left of a blue square"
    assert record(pair) == {
        "tag": "position", "prompt": "a red circle on the left of a blue square",
        "include": [{"class": "square", "count": 1, "color": "blue"},
                    {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}],
    }  # fmt: skip
    two = Spec((("green", "triangle"), ("green", "triangle")))
    assert caption(two) == "two green triangles"
    assert record(two)["include"] == [{"class": "triangle", "count": 2, "color": "green"}]
    assert record(two)["exclude"] == [{"class": "triangle", "count": 3}]
    assert caption(Spec((("yellow", "square"),))) == "a yellow square"
    assert len(SPECS) == 12 + 12 + 6 * 16 * 4 and len({caption(s) for s in SPECS}) == len(SPECS)


def test_shape_fill_ratios_match_the_detector_cuts():
    for shape, ideal in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        mask = shape_mask(shape, 32, 32, 20, 64)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        assert abs(fill - ideal) < 0.06 and classify_fill(float(fill)) == shape


def test_generator_and_detector_agree_on_every_scene():
    rng, detector = np.random.default_rng(123), ShapesDetector()
    for i in range(300):
        spec = SPECS[i % len(SPECS)] if i < len(SPECS) else SPECS[int(rng.integers(len(SPECS)))]
        scene = layout(spec, rng)
        found = detector(_chw(render(scene)))
        assert sorted((d.label, d.color) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
        for d in found:  # box centres match the drawn objects to a pixel
            cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
            assert min(abs(o.cx - cx) + abs(o.cy - cy) for o in scene.objects) <= 1.5
        if spec.kind == "position":
            box = {o.shape: d.box for o in scene.objects for d in found if d.label == o.shape}
            assert spec.relation in relative_position(box[spec.objects[0][1]], box[spec.objects[1][1]])
        assert clause_scores(check_clauses(Clauses.from_record(record(spec)), found)) == (1.0, 1.0), caption(spec)


def test_detector_tolerates_noise_and_blur():
    rng = np.random.default_rng(0)
    spec = Spec((("red", "circle"), ("yellow", "triangle")), "above")
    scene = layout(spec, rng)
    image = torch.from_numpy(render(scene)).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (blurred + torch.from_numpy(rng.normal(0, 12, blurred.shape)).float()).clamp(0, 255).round()
    noisy = noisy[0].to(torch.uint8)
    noisy[:, 2, 2] = torch.tensor([30, 60, 220], dtype=torch.uint8)  # a one-pixel blue speck: below min_area
    found = ShapesDetector()(noisy)
    assert sorted((d.label, d.color) for d in found) == [("circle", "red"), ("triangle", "yellow")]
    assert clause_scores(check_clauses(Clauses.from_record(record(spec)), found)) == (1.0, 1.0)


def test_corrupt_changes_a_colour_or_flips_the_relation():
    rng = np.random.default_rng(0)
    for spec in SPECS[::7]:
        wrong = corrupt(spec, rng, list(COLORS))
        assert wrong != spec and wrong.kind == spec.kind
        assert [s for _, s in wrong.objects] == [s for _, s in spec.objects]  # shapes are kept
        if wrong.relation != spec.relation:
            assert wrong.objects == spec.objects


@pytest.mark.parametrize("share", [0.0, 0.25, 0.3])
def test_noisy_caption_share_is_the_configured_one(share):
    config = WorldDataConfig(num_pretrain=200, noise_share=share)
    rows = image_split(config, "pretrain")
    noisy = [r for r in rows if r.noisy]
    assert len(noisy) == round(share * 200)
    assert all(r.caption != caption(r.scene.spec) for r in noisy)
    assert all(r.caption == caption(r.scene.spec) for r in rows if not r.noisy)
    assert not any(r.noisy for r in image_split(config, "sft"))


def test_splits_are_deterministic_and_eval_captions_are_held_out():
    config = WorldDataConfig(num_pretrain=100, num_sft=300, num_prefs=200, num_eval=40)
    pools = partition(config)
    held_out = {caption(s) for kind in pools["eval"].values() for s in kind}
    sft = image_split(config, "sft")
    prefs, evals = prompt_split(config, "prefs"), prompt_split(config, "eval")
    assert held_out and not held_out & {r.caption for r in sft + prefs}
    assert {r.caption for r in evals} <= held_out and len({r.caption for r in evals}) == 40
    assert len({r.caption for r in prefs}) == 200
    heldout = image_split(config, "heldout")  # clean images of held-out captions, for drift guards only
    assert {r.caption for r in heldout} <= held_out and not any(r.noisy for r in heldout)
    assert all(r.caption == caption(r.scene.spec) for r in heldout)
    assert {r.spec.kind for r in evals} == {"single", "counting", "position"}
    again = image_split(config, "sft")
    assert [(r.caption, r.scene) for r in sft] == [(r.caption, r.scene) for r in again]
    other = image_split(WorldDataConfig(seed=1, num_sft=300), "sft")
    assert [r.scene for r in other] != [r.scene for r in sft]


def test_writers_produce_the_sft_parquet_and_geneval_jsonl(tmp_path):
    config = WorldDataConfig(num_pretrain=20, noise_share=0.5)
    rows = image_split(config, "pretrain")
    table = pq.read_table(write_parquet(rows, tmp_path / "p.parquet"))
    assert table.column_names[:2] == ["caption", "image"] and table.num_rows == 20
    from alignment.sft_data import SftDataConfig, load_pairs

    captions, images = load_pairs(SftDataConfig(path=str(tmp_path / "p.parquet")))
    assert captions == [r.caption for r in rows] and images.shape == (20, 3, 64, 64)
    assert torch.equal(images[0], _chw(render(rows[0].scene)))
    lines = write_metadata([r.spec for r in rows[:3]], tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == [r.caption for r in rows[:3]]
