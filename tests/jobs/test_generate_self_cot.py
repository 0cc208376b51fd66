"""`nsalign generate --self-cot` through the same entry point users call: each image's reasoning printed and
written beside the grid; without --self-cot nothing changes; bad CoT flags exit 2 with one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from base_model.checkpoint import build_random
from base_model.generate import generate_images, make_grid, sample_prompts
from base_model.sampler import SamplingConfig
from base_model.text import CotConfig
from jobs.cli import main

PROMPTS = ["a red circle", "two squares"]
COT_FLAGS = ["--self-cot", "--cot-template", "{caption}. plan:", "--max-text-tokens", "6", "--text-top-p", "0.9"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: two on two busy cores are ~50x slower for this tiny model; the suite gets its count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(out, *extra) -> int:
    args = ["generate", "--checkpoint", "tiny", "--num-images", "2", "--steps", "2", "--seed", "5", "--out", str(out)]
    return main([*args, *[a for p in PROMPTS for a in ("--prompt", p)], *extra])


def test_self_cot_prints_and_writes_each_images_reasoning(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert _generate(out, *COT_FLAGS) == 0
    assert np.asarray(Image.open(out)).shape == (2 * 64, 2 * 64, 3)
    records = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [(r["row"], r["column"], r["prompt"], r["seed"]) for r in records] == [
        (0, 0, "a red circle", 5), (0, 1, "a red circle", 6), (1, 0, "two squares", 5), (1, 1, "two squares", 6),
    ]  # fmt: skip
    # each record is what that (prompt, seed) writes under the flags' CotConfig
    tiny = build_random("tiny", seed=0)
    sampling = SamplingConfig(image_size=64, num_head_steps=2, self_cot=True,
                              cot=CotConfig(template="{caption}. plan:", max_text_tokens=6, top_p=0.9))  # fmt: skip
    text = sample_prompts(tiny, [r["prompt"] for r in records], [r["seed"] for r in records], sampling).text
    assert [r["text_ids"] for r in records] == text.rows()
    assert [r["stopped"] for r in records] == text.stopped.tolist()
    for r in records:
        assert len(r["text_ids"]) <= 6 and r["text"] == tiny.tokenizer.decode(r["text_ids"], skip_special_tokens=False)
    printed = capsys.readouterr().out
    assert printed.count("reasoning, row ") == 4 and "row 2 image 2 (seed 6, " in printed
    assert f"wrote {tmp_path / 'g.jsonl'}" in printed


def test_without_self_cot_nothing_changes(tmp_path, capsys):
    out = tmp_path / "plain.png"
    assert _generate(out) == 0
    assert not (tmp_path / "plain.jsonl").exists() and "reasoning" not in capsys.readouterr().out
    tiny = build_random("tiny", seed=0)
    images = generate_images(tiny, [p for p in PROMPTS for _ in range(2)], [5, 6, 5, 6],
                             SamplingConfig(image_size=64, num_head_steps=2))  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), make_grid(images, ncols=2))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-text-tokens", "6"], "--max-text-tokens needs --self-cot"),
        (["--cot-template", "{caption}"], "--cot-template needs --self-cot"),
        (["--self-cot", "--cot-template", "no field"], "cot.template: must contain {caption} exactly once"),
        (["--self-cot", "--text-top-p", "0"], "cot.top_p"),
        (["--self-cot", "--max-text-tokens", "5000"], "fewer reasoning tokens"),
    ],
)
def test_bad_cot_flags_exit_2_with_one_line(tmp_path, capsys, extra, message):
    assert _generate(tmp_path / "o.png", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsalign generate: error:") and message in err[0], err
    assert not list(tmp_path.iterdir())
