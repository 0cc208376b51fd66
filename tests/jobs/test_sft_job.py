"""`nsalign sft` end to end on the tiny preset, DeepSpeed world 1 on CPU: run, resume, errors;
Parquet and WebDataset tar input."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alignment.learner_config import LearnerConfig
from alignment.sft_data import SftDataConfig, expand_braces, load_pairs, load_samples
from base_model.checkpoint import build_random, load_checkpoint
from base_model.teacher_forcing import teacher_forced
from base_model.text import CotConfig
from core.errors import UserError
from core.rng import sample_order
from jobs.cli import main
from jobs.sft import SftConfig, cot_samples, dropped_captions, run_sft, sft_batch

pytestmark = pytest.mark.deepspeed


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 64, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _write_tar(path, files: dict[str, bytes]) -> None:
    """A tar shard holding `files` (member name -> bytes), in this order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _write_shards(directory) -> None:
    """The Parquet fixture's pairs, in the same order, as two shards: a .txt and a .json caption in the
    first, a sample in a sub-folder next to a file of an unknown kind (ignored) in the second."""
    directory.mkdir()
    red, green, blue = (_png(v) for v in COLORS.values())
    first = {"s0.png": red, "s0.txt": b"a red square", "s1.json": b'{"prompt": "a green square"}', "s1.png": green}
    _write_tar(directory / "shard-000000.tar", first)
    _write_tar(directory / "shard-000001.tar", {"sub/s2.cls": b"3", "sub/s2.txt": b"a blue square", "sub/s2.png": blue})


@pytest.fixture
def data(tmp_path):
    rows = {"caption": [f"a {c} square" for c in COLORS], "image": [_png(v) for v in COLORS.values()]}
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), path)
    return path


@pytest.fixture
def shards(tmp_path):
    """A brace pattern over the two shards of `_write_shards`."""
    _write_shards(tmp_path / "shards")
    return tmp_path / "shards" / "shard-{000000..000001}.tar"


def _config(tmp_path, data, name, steps, caption_dropout=0.0):
    return SftConfig(
        run_name=name, runs_root=str(tmp_path / "runs"), data=SftDataConfig(path=str(data)), steps=steps,
        micro_batch_samples=2, checkpoint_every=2, keep_last=2, learner=LearnerConfig(lr=1e-3, zero_stage=2),
        caption_dropout=caption_dropout,
    )  # fmt: skip


def test_sample_order_is_an_endless_seeded_stream():
    a = sample_order(3, seed=0, position=0, count=7)
    assert sorted(a[:3]) == [0, 1, 2] and sorted(a[3:6]) == [0, 1, 2]
    assert sample_order(3, 0, 2, 3) == a[2:5]


@pytest.mark.parametrize("input_format", ["data", "shards"])  # Parquet, WebDataset
def test_sft_resume_equals_a_straight_run(tmp_path, request, input_format):
    data = request.getfixturevalue(input_format)
    straight = run_sft(_config(tmp_path, data, "straight", 4))
    partial = run_sft(_config(tmp_path, data, "resumed", 2))
    assert (partial / "latest").read_text().strip() == "step_000002"
    run_sft(_config(tmp_path, data, "resumed", 4))  # same run name: continues from step 2
    a = load_checkpoint(straight / "step_000004" / "model").model.state_dict()
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "step_000004" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(r)["step"] for r in (partial / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dropped_captions_depend_only_on_the_stream_position():
    assert dropped_captions(0, 0, 5, rate=0.0) == [False] * 5
    whole = dropped_captions(3, 10, 8, rate=0.5)
    assert dropped_captions(3, 10, 3, 0.5) + dropped_captions(3, 13, 5, 0.5) == whole  # any step split
    assert dropped_captions(4, 10, 8, 0.5) != whole  # another seed, other draws
    share = sum(dropped_captions(0, 0, 4000, rate=0.1)) / 4000
    assert 0.08 < share < 0.12


def test_caption_dropout_trains_differently_and_resumes_exactly(tmp_path, data):
    plain = run_sft(_config(tmp_path, data, "plain", 4))
    straight = run_sft(_config(tmp_path, data, "straight", 4, caption_dropout=0.5))
    run_sft(_config(tmp_path, data, "resumed", 2, caption_dropout=0.5))
    resumed = run_sft(_config(tmp_path, data, "resumed", 4, caption_dropout=0.5))
    a, b, c = (load_checkpoint(r / "step_000004" / "model").model.state_dict() for r in (straight, resumed, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_config_and_missing_data_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nstepz: 3\ndata: {path: nowhere.parquet}\n")
    assert main(["sft", str(bad)]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(f"run_name: x\nruns_root: {tmp_path}/runs\ndata: {{path: {tmp_path}/nowhere.parquet}}\n")
    assert main(["sft", str(good)]) == 2
    assert "SFT data not found" in capsys.readouterr().err
    assert main(["sft", str(good), "learner.zero_stage=5"]) == 2
    assert "zero_stage" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()  # nothing written before the input is validated


def test_zero3_publishes_the_full_trained_weights(tmp_path, data):
    """Under ZeRO-3 the engine's module holds empty partitions: the checkpoint must hold gathered weights."""
    config = _config(tmp_path, data, "z3", 1)
    config.learner.zero_stage = 3
    run = run_sft(config)
    start = build_random("tiny").model.state_dict()
    saved = load_checkpoint(run / "step_000001" / "model").model.state_dict()  # loads: every shape is full
    assert any(not torch.equal(start[k], saved[k]) for k in start)  # and it is the trained model


def test_ema_weights_follow_the_formula_and_survive_a_resume(tmp_path, data):
    """ema_2 = d (d w0 + (1 - d) w1) + (1 - d) w2 with w_k the weights after step k; step 2 is a resumed run."""
    d = 0.9
    config = _config(tmp_path, data, "ema", 1)
    config.checkpoint_every, config.keep_last, config.ema_decay = 1, 5, d
    run = run_sft(config)
    config.steps = 2
    run_sft(config)  # the same command with more steps: resumes the EMA from step_000001/ema
    w0 = build_random("tiny").model.state_dict()
    w1, w2, ema = (load_checkpoint(run / f).model.state_dict() for f in ("step_000001/model", "step_000002/model",
                                                                          "step_000002/ema"))  # fmt: skip
    for k in w0:
        expected = d * (d * w0[k] + (1 - d) * w1[k]) + (1 - d) * w2[k]
        torch.testing.assert_close(ema[k], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema[k], w2[k]) for k in w0)


# -- WebDataset input ----------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("d/s-{08..10}.tar") == ["d/s-08.tar", "d/s-09.tar", "d/s-10.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("one.tar") == ["one.tar"]


def test_tar_shards_read_the_same_pairs_as_parquet(tmp_path, data, shards):
    captions, images = load_pairs(SftDataConfig(path=str(data)))
    assert captions == ["a red square", "a green square", "a blue square"]
    for spec in (shards, shards.parent, shards.parent / "shard-000000.tar"):  # pattern, directory, one file
        got_captions, got_images = load_pairs(SftDataConfig(path=str(spec)))
        n = len(got_captions)
        assert got_captions == captions[:n] and torch.equal(got_images, images[:n])
    assert images.shape == (3, 3, 64, 64) and images[0, :, 0, 0].tolist() == [255, 0, 0]  # 80x64 -> centre 64x64


def test_sft_end_to_end_on_tar_shards(tmp_path, shards, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(f"run_name: wds\nruns_root: {tmp_path}/runs\ndata: {{path: '{shards.parent}'}}\nsteps: 1\n"
                   "micro_batch_samples: 2\ncheckpoint_every: 1\nlearner: {lr: 1.0e-3}\n")  # fmt: skip
    assert main(["sft", str(config)]) == 0
    assert "sft: 3 pairs" in capsys.readouterr().out
    run = tmp_path / "runs" / "wds"
    assert (run / "latest").read_text().strip() == "step_000001"
    assert json.loads((run / "metrics.jsonl").read_text())["sft/flow_matching"] > 0


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "shard-000000.tar: empty shard (no samples)"),
        ({"a.png": _png((1, 2, 3)), "a.txt": b"x", "b.png": _png((1, 2, 3))},
         "shard-000000.tar: sample 'b' has an image but no caption"),
        ({"a.jpg": b"not an image", "a.txt": b"x"}, "shard-000000.tar: sample 'a': image bytes are not a readable"),
        ({"a.png": _png((1, 2, 3)), "a.json": b'{"title": "x"}'}, "shard-000000.tar: sample 'a': empty caption"),
        ("missing", "SFT data not found: "),
    ],
)  # fmt: skip
def test_bad_tar_input_exits_2_before_the_run_dir(tmp_path, capsys, files, message):
    shard = tmp_path / "shard-000000.tar"
    if files != "missing":
        _write_tar(shard, files)
    config = tmp_path / "sft.yaml"
    pattern = f"{tmp_path}/shard-{{000000..000000}}.tar"
    config.write_text(f"run_name: x\nruns_root: {tmp_path}/runs\ndata: {{path: '{pattern}'}}\n")
    assert main(["sft", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsalign sft: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


# -- Self-CoT SFT ----------------------------------------------------------------------------------


PLAN = "1 shape: {} square centre"


@pytest.fixture
def plans(tmp_path):
    """The Parquet fixture's pairs with a `plan` column (the reasoning)."""
    rows = {"caption": [f"a {c} square" for c in COLORS], "image": [_png(v) for v in COLORS.values()],
            "plan": [PLAN.format(c) for c in COLORS]}  # fmt: skip
    path = tmp_path / "plans.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def _cot_config(tmp_path, data, name, steps, cot_fraction):
    config = _config(tmp_path, data, name, steps, caption_dropout=0.25)
    config.data.reasoning_field, config.cot_fraction, config.lm_loss_weight = "plan", cot_fraction, 1.0
    config.cot = CotConfig(template="{caption}. plan: ", max_text_tokens=32)
    return config


def test_cot_samples_depend_only_on_the_stream_position():
    assert cot_samples(0, 0, 5, fraction=0.0) == [False] * 5 and cot_samples(0, 0, 5, fraction=1.0) == [True] * 5
    whole = cot_samples(3, 10, 8, 0.5)
    assert cot_samples(3, 10, 3, 0.5) + cot_samples(3, 13, 5, 0.5) == whole
    assert whole != dropped_captions(3, 10, 8, 0.5)  # a stream of its own
    assert 0.45 < sum(cot_samples(0, 0, 4000, 0.5)) / 4000 < 0.55


def test_a_cot_row_is_template_caption_plan_then_the_image_prefix_and_all_of_it_is_a_text_target():
    bundle = build_random("tiny", seed=0)
    cot = CotConfig(template="{caption}. plan: ")
    plan_ids = bundle.tokenizer(["1 shape: red square centre"], add_special_tokens=False)["input_ids"]
    batch = sft_batch(bundle.tokenizer, bundle.ids, ["a red square"], plan_ids, (64, 64), cot, 512)
    assert bundle.tokenizer.decode(batch.input_ids[0]) == (
        "a red square. plan: 1 shape: red square centre<|image_area|>4*4<|begin_of_image|>"
    )
    plain = sft_batch(bundle.tokenizer, bundle.ids, ["a red square"], None, (64, 64), cot, 512)
    assert bundle.tokenizer.decode(plain.input_ids[0]) == "a red square<|image_area|>4*4<|begin_of_image|>"
    tokens = torch.zeros(1, 16, 64)
    # targets: every prompt token after the first, then <|end_of_image|>: 20 + 26 + 5 - 1 + 1 (CoT), 12 + 5 - 1 + 1
    forced = teacher_forced(bundle.model, batch, bundle.ids, tokens, compute_text_ce=True)
    assert forced.num_text_targets == 51
    assert teacher_forced(bundle.model, plain, bundle.ids, tokens, compute_text_ce=True).num_text_targets == 17


def test_self_cot_sft_resumes_exactly(tmp_path, plans):
    straight = run_sft(_cot_config(tmp_path, plans, "straight", 4, cot_fraction=0.5))
    run_sft(_cot_config(tmp_path, plans, "resumed", 2, cot_fraction=0.5))
    resumed = run_sft(_cot_config(tmp_path, plans, "resumed", 4, cot_fraction=0.5))
    a, b = (load_checkpoint(r / "step_000004" / "model").model.state_dict() for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    shares = [json.loads(r)["sft/cot_share"] for r in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(shares) == 4 and set(shares) <= {0.0, 0.5, 1.0}  # 2 samples a step


def test_self_cot_sft_learns_the_plan(tmp_path, plans):
    config = _cot_config(tmp_path, plans, "only_cot", 4, cot_fraction=1.0)
    config.caption_dropout, config.learner.lr = 0.0, 1e-2
    run = run_sft(config)
    metrics = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["sft/cot_share"] == 1.0 for m in metrics)
    nll = [m["sft/reasoning_nll"] for m in metrics]  # per plan token and stop event, ~log(261) untrained
    assert nll[0] > 5.0 and nll[-1] < nll[0] - 1.0, nll


def test_no_cot_share_is_plain_sft_reasoning_column_or_not(tmp_path, data, plans):
    none = _cot_config(tmp_path, plans, "none", 2, cot_fraction=0.0)
    none.lm_loss_weight = None
    plain = _config(tmp_path, data, "plain", 2, caption_dropout=0.25)
    a, b = (load_checkpoint(run_sft(x) / "step_000002" / "model").model.state_dict() for x in (none, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_self_cot_input_exits_2(tmp_path, plans, capsys):
    good = f"run_name: x\nruns_root: {tmp_path}/runs\ndata: {{path: {plans}, reasoning_field: plan}}\n"
    config = tmp_path / "c.yaml"
    config.write_text(good.replace("reasoning_field: plan", "image_size: 64") + "cot_fraction: 0.5\n")
    assert main(["sft", str(config)]) == 2
    assert "cot_fraction: 0.5 needs data.reasoning_field" in capsys.readouterr().err
    config.write_text(good + "cot_fraction: 0.5\ncot: {max_text_tokens: 20}\n")
    assert main(["sft", str(config)]) == 2
    assert "row 0: reasoning of 26 tokens is longer than cot.max_text_tokens=20" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()


def test_tar_shards_carry_the_reasoning_in_the_json(tmp_path):
    red = _png(COLORS["red"])
    files = {"s0.png": red, "s0.txt": b"a red square", "s0.json": b'{"plan": "1 shape: red square centre"}',
             "s1.png": red, "s1.json": b'{"caption": "a red square", "plan": "1 shape: red square top"}'}  # fmt: skip
    _write_tar(tmp_path / "s.tar", files)
    samples = load_samples(SftDataConfig(path=str(tmp_path / "s.tar"), reasoning_field="plan"))
    assert samples.captions == ["a red square"] * 2
    assert samples.reasonings == ["1 shape: red square centre", "1 shape: red square top"]
    _write_tar(tmp_path / "bad.tar", {"s0.png": red, "s0.txt": b"a red square"})
    with pytest.raises(UserError, match="s0.*empty reasoning \\('plan'\\)"):
        load_samples(SftDataConfig(path=str(tmp_path / "bad.tar"), reasoning_field="plan"))
