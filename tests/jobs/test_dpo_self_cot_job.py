"""`nsalign dpo` on Self-CoT pairs (tiny preset, DeepSpeed on CPU): the text term's metrics in training and
held-out evaluation, lm_head trained only with `text_loss`, exact resume, and one-line refusals.

The dataset is written here in the prefs format (`pairs_table(..., self_cot=True)`): 4 Self-CoT samples per
prompt from the tiny random model (its own reasoning, then its image), best vs worst by JPEG compressibility.
"""

import dataclasses
import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from alignment.learner_config import LearnerConfig
from base_model.checkpoint import build_random, load_checkpoint
from base_model.sampler import SamplingConfig
from base_model.text import CotConfig
from core.formats import shard_name
from jobs.cli import main
from jobs.dpo import DpoConfig, DpoDataConfig, run_dpo
from rollout.prefs_format import DATA_DIR, pairs_table, png_bytes, read_pairs

pytestmark = pytest.mark.deepspeed

COT = CotConfig(template="{caption}. plan:", max_text_tokens=6)
SAMPLING = SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4, self_cot=True, cot=COT)
SUBJECTS = ["cat", "house", "tree", "boat", "car", "bird", "lamp", "flower"]
TEXT_METRICS = ("image_margin", "text_margin", "text_logratio_chosen", "text_logratio_rejected")


def write_prefs(out, rows: list[dict], self_cot: bool):
    (out / DATA_DIR).mkdir(parents=True)
    pq.write_table(pairs_table(rows, ["jpeg"], self_cot=self_cot), out / DATA_DIR / shard_name(0))
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """(Self-CoT dataset, the same pairs without their reasoning) from one Self-CoT rollout."""
    from rewards.jpeg import JpegReward
    from rollout.prompts import Prompt, prompt_id
    from rollout.worker import RolloutWorker

    texts, group = [f"a {s} number {i}" for i, s in enumerate(SUBJECTS)], 4
    batch = RolloutWorker("tiny", SAMPLING, micro_batch_samples=32).rollout(
        [Prompt(prompt_id(t), t) for t in texts], group
    )
    scores = JpegReward("compressibility", 95)(batch.images, batch.prompts).scores  # [P * G]
    cot_rows, plain_rows = [], []
    for p in range(len(texts)):
        g = scores[p * group : (p + 1) * group]
        best, worst = p * group + int(g.argmax()), p * group + int(g.argmin())
        row = dict(
            prompt_id=batch.prompt_ids[best], prompt=batch.prompts[best], pair_index=0,
            chosen_image=png_bytes(batch.images[best]), rejected_image=png_bytes(batch.images[worst]),
            chosen_tokens=batch.tokens[best], rejected_tokens=batch.tokens[worst],
            chosen_scores={"jpeg": float(scores[best])}, rejected_scores={"jpeg": float(scores[worst])},
            chosen_reward=float(scores[best]), rejected_reward=float(scores[worst]),
            chosen_seed=int(batch.seeds[best]), rejected_seed=int(batch.seeds[worst]),
            chosen_sample_index=best % group, rejected_sample_index=worst % group,
            strategy="best_worst", checkpoint="tiny", policy_version=0,
        )  # fmt: skip
        plain_rows.append({**row, "sampling": json.dumps({"image_size": 64})})
        ids = batch.text.rows()
        cot_rows.append({
            **row, "sampling": json.dumps({"image_size": 64, "self_cot": True, "cot": dataclasses.asdict(COT)}),
            "chosen_text": batch.texts[best], "rejected_text": batch.texts[worst],
            "chosen_text_ids": ids[best], "rejected_text_ids": ids[worst],
            "chosen_text_stopped": bool(batch.text.stopped[best]),
            "rejected_text_stopped": bool(batch.text.stopped[worst]),
        })  # fmt: skip
    root = tmp_path_factory.mktemp("prefs")
    return write_prefs(root / "cot", cot_rows, True), write_prefs(root / "plain", plain_rows, False)


def _cfg(tmp_path, prefs, name, steps, **kw) -> DpoConfig:
    base = dict(
        run_name=name, runs_root=str(tmp_path / "runs"), data=DpoDataConfig(path=str(prefs)), steps=steps,
        pairs_per_step=4, micro_batch_pairs=2, beta=500.0, checkpoint_every=2, keep_last=2,
        learner=LearnerConfig(lr=1e-3, zero_stage=2), text_loss=True, text_beta=0.1,
    )  # fmt: skip
    base.update(kw)
    return DpoConfig(**base)


def _rows(run) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def _lm_head(run, step) -> torch.Tensor:
    return load_checkpoint(run / f"step_{step:06d}" / "model").model.lm_head.weight


def test_the_dataset_carries_both_reasonings(datasets):
    pairs = read_pairs(datasets[0])
    assert pairs.self_cot and pairs.cot == COT and len(pairs) == 8
    assert all(1 <= len(t) <= 6 for t in pairs.chosen_text_ids + pairs.rejected_text_ids)
    assert not read_pairs(datasets[1]).self_cot


def test_self_cot_dpo_with_the_text_term_end_to_end(tmp_path, datasets):
    run = run_dpo(_cfg(tmp_path, datasets[0], "text", 3, data=DpoDataConfig(str(datasets[0]), eval_fraction=0.25),
                       eval_every=2))  # fmt: skip
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {f"dpo/{n}" for n in TEXT_METRICS} <= set(rows[0])
    assert {f"dpo_eval/{n}" for n in TEXT_METRICS} <= set(rows[1]) and "dpo_eval/text_margin" in rows[2]
    # step 1: policy == reference, text and image alike
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["dpo/text_margin"] == 0.0 and rows[0]["dpo/text_logratio_chosen"] == 0.0
    assert rows[1]["dpo/text_logratio_chosen"] != 0.0  # the reasoning's likelihood moved after one update
    # the sigmoid sees the sum of both margins
    assert rows[1]["dpo/margin"] == pytest.approx(rows[1]["dpo/image_margin"] + rows[1]["dpo/text_margin"], abs=1e-5)
    start = build_random("tiny", seed=0).model.lm_head.weight
    assert not torch.equal(_lm_head(run, 3), start)


def test_without_the_text_term_lm_head_stays_and_no_text_metric_is_logged(tmp_path, datasets):
    run = run_dpo(_cfg(tmp_path, datasets[0], "image", 2, text_loss=False))
    rows = _rows(run)
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6) and "dpo/text_margin" not in rows[1]
    assert torch.equal(_lm_head(run, 2), build_random("tiny", seed=0).model.lm_head.weight)
    head = load_checkpoint(run / "step_000002" / "model").model.image_head.net.input_proj.weight
    assert not torch.equal(head, build_random("tiny", seed=0).model.image_head.net.input_proj.weight)


def test_resume_with_the_text_term_is_exact(tmp_path, datasets):
    straight = run_dpo(_cfg(tmp_path, datasets[0], "straight", 4))
    run_dpo(_cfg(tmp_path, datasets[0], "resumed", 2))
    resumed = run_dpo(_cfg(tmp_path, datasets[0], "resumed", 4))
    a = load_checkpoint(straight / "step_000004" / "model").model.state_dict()
    b = load_checkpoint(resumed / "step_000004" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["dpo/text_margin"] for r in _rows(resumed)] == [r["dpo/text_margin"] for r in _rows(straight)]


def _one_line_exit_2(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsalign dpo: error: ") and len(err.splitlines()) == 1 and expect in err, err


def test_bad_input_exits_2_with_one_line(tmp_path, datasets, capsys):
    cot, plain = datasets
    config = tmp_path / "dpo.yaml"
    config.write_text(f"run_name: x\nruns_root: {tmp_path}/runs\ndata: {{path: {cot}}}\ntext_loss: true\n")
    _one_line_exit_2(
        capsys, ["dpo", str(config), f"data.path={plain}"], f"text_loss: true needs Self-CoT pairs, but {plain}"
    )
    _one_line_exit_2(capsys, ["dpo", str(config), "text_beta=0"], "text_beta: must be > 0")
    # 4096 positions: a prompt budget that fits the image alone but not with the template and 6 reasoning tokens
    text_tokens = SAMPLING.text_tokens  # "{caption}. plan:" -> 7 bytes + BOS + 6
    need_image_only = 1 + len("4*4") + 1 + 16 + 1
    budget = 4096 - need_image_only - text_tokens + 1
    _one_line_exit_2(capsys, ["dpo", str(config), f"max_prompt_tokens={budget}"], "reasoning")
    assert not (tmp_path / "runs" / "x").exists()
