"""Real learning signals, not just moving numbers: GRPO and Diffusion-DPO on the JPEG-compressibility
reward, starting from the shapes world's pre-trained tiny NextStep (shapes/assets/pretrained, 1M
parameters, committed). A random tiny model cannot show this: its random VAE draws near-identical
images whatever the tokens (JPEG size ~4.0 kB for every sample), so the reward carries no signal.
Here the image depends on the tokens (shapes of several sizes and counts), so compressibility can be
learned: GRPO must move the mean JPEG size the way the reward asks (down, or up) within 24 steps,
DPO must rank held-out pairs well above chance. Both runs are seeded, so on one platform they are deterministic."""

import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from shapes.scenes import all_specs, caption

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "shapes" / "assets" / "pretrained"
JPEG = {"rewards": [{"name": "jpeg", "type": "jpeg", "params": {"direction": "compressibility", "quality": 95}}]}


def _prompts(tmp_path: Path, n: int) -> Path:
    specs = all_specs(["red", "green", "blue", "yellow"], ["circle", "square", "triangle"])
    captions = sorted(caption(s) for s in specs)
    path = tmp_path / "prompts.txt"
    path.write_text("".join(c + "\n" for c in captions[:: len(captions) // n][:n]), encoding="utf-8")
    return path


def _write(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # about 2-6 minutes each on 2 cores: CI runs them with `-m slow`, the default suite does not
@pytest.mark.deepspeed
@pytest.mark.parametrize("direction", ["compressibility", "incompressibility"])
def test_grpo_follows_the_jpeg_reward_in_either_direction(tmp_path, direction):
    # both directions: a run that merely degrades the model (smoother, smaller images) passes one, not both
    config = {
        "run_name": "grpo_jpeg", "runs_root": str(tmp_path / "runs"), "model": str(PRETRAINED),
        "prompts": str(_prompts(tmp_path, 8)),
        "sampling": {"image_size": 64, "cfg_scale": 1.0, "num_head_steps": 6, "sde_kind": "sde",
                     "logprob_reduction": "mean"},
        "rewards": {"rewards": [{"name": "jpeg", "type": "jpeg", "params": {"direction": direction, "quality": 95}}]},
        "rollout": {"micro_batch_samples": 32},
        "steps": 24, "prompts_per_step": 4, "samples_per_prompt": 8, "micro_batch_samples": 32,
        "clip_eps": 1e-4, "beta": 0.0, "learner": {"lr": 1e-3, "zero_stage": 0},
        "checkpoint_every": 100, "keep_last": 1,
    }  # fmt: skip
    assert main(["grpo", _write(tmp_path, "grpo", config)]) == 0
    sizes = [m["reward/jpeg/size_kb/mean"] for m in _metrics(tmp_path / "runs" / "grpo_jpeg") if "reward/mean" in m]
    first, last = sum(sizes[:4]) / 4, sum(sizes[-4:]) / 4  # 128 images each
    # measured: compressibility 2.07 -> 1.48 kB, incompressibility 2.35 -> 3.84 kB; a 128-image mean's spread ~0.03 kB
    change = last - first if direction == "incompressibility" else first - last
    assert change > 0.2, f"{direction}: mean JPEG size {first:.3f} kB (steps 1-4) -> {last:.3f} kB (steps 21-24)"


@pytest.mark.deepspeed
def test_dpo_on_compressibility_pairs_ranks_held_out_pairs_above_chance(tmp_path):
    prefs = {
        "out_dir": str(tmp_path / "prefs"), "model": str(PRETRAINED),
        "prompts": {"path": str(_prompts(tmp_path, 64)), "limit": None},
        "samples_per_prompt": 8, "prompts_per_shard": 32,
        "sampling": {"image_size": 64, "cfg_scale": 1.0, "num_head_steps": 10},
        "rollout": {"micro_batch_samples": 128, "pool": {"kind": "local"}},
        "rewards": {**JPEG, "pool": {"kind": "local"}},
        "pairs": {"strategy": "nextstep", "primary": "jpeg", "top_k": 2, "pairs_per_prompt": 4},
    }  # fmt: skip
    assert main(["build-prefs", _write(tmp_path, "prefs", prefs)]) == 0
    dpo = {
        "run_name": "dpo_jpeg", "runs_root": str(tmp_path / "runs"), "model": str(PRETRAINED),
        "data": {"path": str(tmp_path / "prefs"), "eval_fraction": 0.3},  # held out by prompt
        "beta": 1000.0, "steps": 20, "pairs_per_step": 16, "micro_batch_pairs": 16, "eval_every": 20,
        "eval_micro_batch_pairs": 128, "checkpoint_every": 100, "keep_last": 1,
        "learner": {"lr": 3e-4, "lr_schedule": "constant", "max_grad_norm": 1.0, "zero_stage": 0},
    }  # fmt: skip
    assert main(["dpo", _write(tmp_path, "dpo", dpo)]) == 0
    evals = [m for m in _metrics(tmp_path / "runs" / "dpo_jpeg") if "dpo_eval/implicit_accuracy" in m]
    acc = evals[-1]["dpo_eval/implicit_accuracy"]
    # ~75 held-out pairs of prompts never trained on; chance is 0.5 (binomial spread ~0.06); measured 0.76
    assert acc >= 0.65, f"held-out implicit accuracy {acc:.3f}"
    assert evals[-1]["dpo_eval/margin"] > 0
