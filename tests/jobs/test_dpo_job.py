"""`nsalign dpo` on the tiny preset, DeepSpeed on CPU: maths, end to end, resume, learning signal, errors.

The preference data are built here (not with build-prefs): G images per prompt from the tiny random
model, scored by JPEG compressibility, best vs worst, written as one shard in the prefs format.
"""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignment.learner_config import LearnerConfig
from alignment.objectives import make_batch, pair_noise
from base_model.checkpoint import load_checkpoint
from base_model.sampler import SamplingConfig
from core.formats import shard_name
from jobs.cli import main
from jobs.dpo import DpoConfig, DpoDataConfig, run_dpo, split_by_prompt
from rollout.prefs_format import DATA_DIR, pairs_schema, png_bytes, read_pairs

pytestmark = pytest.mark.deepspeed

SAMPLING = SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4)
SUBJECTS = ["cat", "house", "tree", "boat", "car", "bird", "lamp", "flower"]
STYLES = ["red", "striped", "tiny", "old", "shiny", "blue"]


def build_jpeg_prefs(out, num_prompts: int, samples_per_prompt: int, run_seed: int = 0):
    """One shard of best-vs-worst pairs by JPEG compressibility from the tiny random model."""
    from rewards.jpeg import JpegReward
    from rollout.prompts import Prompt, prompt_id
    from rollout.worker import RolloutWorker

    texts = [f"a {STYLES[i % len(STYLES)]} {SUBJECTS[i // len(STYLES) % len(SUBJECTS)]} number {i}"
             for i in range(num_prompts)]  # fmt: skip
    worker = RolloutWorker("tiny", SAMPLING, micro_batch_samples=64, run_seed=run_seed)
    batch = worker.rollout([Prompt(prompt_id(t), t) for t in texts], samples_per_prompt)
    scores = JpegReward("compressibility", 95)(batch.images, batch.prompts).scores.view(num_prompts, -1)
    rows = {name: [] for name in pairs_schema(["jpeg"]).names}
    flat = scores.view(-1)
    for p in range(num_prompts):
        best, worst = (p * samples_per_prompt + int(i) for i in (scores[p].argmax(), scores[p].argmin()))
        row = dict(
            prompt_id=batch.prompt_ids[best], prompt=batch.prompts[best], pair_index=0,
            chosen_image=png_bytes(batch.images[best]), rejected_image=png_bytes(batch.images[worst]),
            chosen_tokens=batch.tokens[best].tolist(), rejected_tokens=batch.tokens[worst].tolist(),
            chosen_scores={"jpeg": flat[best].item()}, rejected_scores={"jpeg": flat[worst].item()},
            chosen_reward=flat[best].item(), rejected_reward=flat[worst].item(),
            chosen_seed=int(batch.seeds[best]), rejected_seed=int(batch.seeds[worst]),
            chosen_sample_index=best % samples_per_prompt, rejected_sample_index=worst % samples_per_prompt,
            strategy="best_vs_worst", sampling=json.dumps({"image_size": SAMPLING.image_size}), checkpoint="tiny",
            policy_version=0,
        )  # fmt: skip
        for k, v in row.items():
            rows[k].append(v)
    (out / DATA_DIR).mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=pairs_schema(["jpeg"])), out / DATA_DIR / shard_name(0))
    return out


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return build_jpeg_prefs(tmp_path_factory.mktemp("prefs"), num_prompts=16, samples_per_prompt=4)


def _cfg(tmp_path, prefs, name, steps, **kw) -> DpoConfig:
    base = dict(
        run_name=name, runs_root=str(tmp_path / "runs"), data=DpoDataConfig(path=str(prefs)), steps=steps,
        pairs_per_step=4, micro_batch_pairs=2, beta=500.0, checkpoint_every=2, keep_last=2,
        learner=LearnerConfig(lr=1e-3, zero_stage=2),
    )  # fmt: skip
    base.update(kw)
    return DpoConfig(**base)


def test_pair_noise_is_a_pure_function_of_seed_stream_position():
    t, e = pair_noise(0, 0, 5, num_tokens=16, dim=64)
    t2, e2 = pair_noise(0, 0, 5, num_tokens=16, dim=64)
    assert torch.equal(t, t2) and torch.equal(e, e2) and t.shape == (16,) and e.shape == (16, 64)
    assert ((t > 0) & (t < 1)).all()
    assert not torch.equal(pair_noise(0, 1, 5, 16, 64)[1], e) and not torch.equal(pair_noise(1, 0, 5, 16, 64)[1], e)


def test_split_by_prompt_holds_out_whole_prompts_deterministically():
    prompts = ["a", "b", "a", "c", "d", "b", "e"]
    s = split_by_prompt(prompts, 0.4)  # 5 prompts -> 2 held out
    assert s.num_eval_prompts == 2 and s.num_train_prompts == 3
    assert sorted(s.train + s.eval) == list(range(7))
    assert not {prompts[i] for i in s.train} & {prompts[i] for i in s.eval}
    assert split_by_prompt(list(reversed(prompts)), 0.4).num_eval_prompts == 2
    assert {prompts[i] for i in s.eval} == {
        list(reversed(prompts))[i] for i in split_by_prompt(prompts[::-1], 0.4).eval
    }
    assert split_by_prompt(prompts, 0.0).eval == []


def test_make_batch_shares_noise_between_winner_and_loser(prefs):
    pairs = read_pairs(prefs)
    b = make_batch(pairs, [3, 7], [10, 11], seed=0, stream=0)
    assert b.chosen.shape == b.rejected.shape == b.noise.shape == (2, 16, 64) and b.t.shape == (2, 16)
    assert torch.equal(b.t[1], pair_noise(0, 0, 11, 16, 64)[0])
    assert b.prompts == [pairs.prompts[3], pairs.prompts[7]]


def test_jpeg_pairs_prefer_the_smaller_file(prefs):
    pairs = read_pairs(prefs)
    assert len(pairs) == 16 and pairs.image_size == 64
    assert (pairs.chosen_reward > pairs.rejected_reward).all()


def test_dpo_end_to_end_world_1(tmp_path, prefs):
    run = run_dpo(_cfg(tmp_path, prefs, "e2e", 3, data=DpoDataConfig(path=str(prefs), eval_fraction=0.25),
                       eval_every=2))  # fmt: skip
    assert (run / "latest").read_text().strip() == "step_000003"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    names = {"dpo/loss", "dpo/implicit_accuracy", "dpo/margin", "dpo/mse_w", "dpo/mse_l", "dpo/ref_mse_w",
             "dpo/ref_mse_l", "train/grad_norm", "train/lr", "train/pairs_per_s"}  # fmt: skip
    assert names <= set(rows[0]) and "dpo_eval/implicit_accuracy" in rows[1] and "dpo_eval/loss" in rows[2]
    assert "dpo_eval/loss" not in rows[0]
    # step 1 starts from policy == reference: the loss is log 2 and the margin 0
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["dpo/margin"] == 0.0
    assert rows[0]["dpo/mse_w"] == pytest.approx(rows[0]["dpo/ref_mse_w"], abs=1e-7)
    assert rows[1]["dpo/loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002", "step_000003"]
    bundle = load_checkpoint(run / "step_000003" / "model")
    assert bundle.model.config.hidden_size == 64


def _weights(run, step):
    return load_checkpoint(run / f"step_{step:06d}" / "model").model.state_dict()


def test_resume_is_exact(tmp_path, prefs):
    """4 steps straight == 2 steps, then the same command continued to 4 (bit-identical, rows once each)."""
    straight = run_dpo(_cfg(tmp_path, prefs, "straight", 4))
    partial = run_dpo(_cfg(tmp_path, prefs, "resumed", 2))
    assert (partial / "latest").read_text().strip() == "step_000002"
    run_dpo(_cfg(tmp_path, prefs, "resumed", 4))
    a, b = _weights(straight, 4), _weights(partial, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["image_head.net.final_layer.linear.weight"], _weights(partial, 2)["image_head.net.final_layer.linear.weight"]
    )
    rows = [json.loads(r) for r in (partial / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["dpo/loss"] for r in rows] == [r["dpo/loss"] for r in first]


def test_lora_dpo_publishes_merged_plain_weights(tmp_path, prefs):
    from alignment.learner_config import LoraConfig

    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["mlp.0", "mlp.2", "final_layer.linear", "q_proj"])
    run = run_dpo(_cfg(tmp_path, prefs, "lora", 2, learner=LearnerConfig(lr=1e-2, zero_stage=2, lora=lora)))
    start = load_checkpoint(run / "step_000002" / "model").model.state_dict()  # loads strictly as a plain model
    from base_model.checkpoint import build_random

    base = build_random("tiny", seed=0).model.state_dict()
    assert set(start) == set(base)
    changed = {k for k in base if not torch.equal(base[k], start[k])}
    assert changed and all(any(t in k for t in ("mlp.0", "mlp.2", "final_layer.linear", "q_proj")) for k in changed)
    assert all(k.endswith("weight") for k in changed)  # LoRA merges into weights only; biases stay


def _one_line_exit_2(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsalign dpo: error: ") and len(err.splitlines()) == 1 and expect in err, err


def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, prefs, capsys):
    config = tmp_path / "dpo.yaml"
    config.write_text(f"run_name: x\nruns_root: {tmp_path}/runs\ndata: {{path: {prefs}}}\n")
    _one_line_exit_2(capsys, ["dpo", str(config), "stepz=3"], "unknown key 'stepz'")
    _one_line_exit_2(capsys, ["dpo", str(config), "beta=high"], "beta: expected a number")
    _one_line_exit_2(capsys, ["dpo", str(config), "pairs_per_step=6", "micro_batch_pairs=4"], "pairs_per_step")
    _one_line_exit_2(capsys, ["dpo", str(config), "data.path="], "data.path: required")
    _one_line_exit_2(capsys, ["dpo", str(config), f"data.path={tmp_path}/nowhere"], "no preference shards")
    _one_line_exit_2(capsys, ["dpo", str(config), "data.eval_fraction=1.5"], "eval_fraction")
    _one_line_exit_2(capsys, ["dpo", str(config), "learner.lora={rank: 0}"], "learner.lora.rank")
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path, prefs):
    """2 CPU processes (gloo): each rank trains on its slice; rank 0 writes a loadable model, metrics, latest."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env["OMP_NUM_THREADS"] = "1"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "jobs.cli", "dpo", str(root / "configs/dpo/tiny.yaml"), f"data.path={prefs}",
           f"runs_root={tmp_path}/runs", "run_name=two", "steps=2", "pairs_per_step=8", "micro_batch_pairs=2",
           "eval_every=2", "checkpoint_every=2"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "two"
    assert (run / "latest").read_text().strip() == "step_000002"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "dpo_eval/implicit_accuracy" in rows[1]
    assert len(list((run / "step_000002" / "engine" / "state").glob("*optim_states.pt"))) == 2  # one per rank
    assert load_checkpoint(run / "step_000002" / "model").model.config.hidden_size == 64
