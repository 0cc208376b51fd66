"""GRPO on the NextStep-1 GitHub release's final_euler time grid: its final deterministic Euler step has
no log-prob, no loss cell and no KL term; the K-1 SDE steps train as on the uniform grid."""

import json
import math
from pathlib import Path

import pytest

from core.schema import load_config
from jobs.cli import main
from jobs.grpo import GrpoConfig, run_grpo

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "grpo" / "tiny.yaml"  # num_head_steps 4: 3 SDE steps + the Euler step
PROMPTS = ROOT / "configs" / "grpo" / "prompts_tiny.txt"


@pytest.mark.deepspeed
def test_grpo_trains_the_sde_steps_of_the_published_grid(tmp_path):
    """Rollouts record 3 log-probs per token; the learner re-scores the same 3 (ratio 1 before any
    update), the flow_grpo KL's per-step factor covers those 3 steps, and every loss stays finite."""
    overrides = [f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}", "run_name=pub", "steps=2",
                 "sampling.time_grid=final_euler", "kl_scale=flow_grpo"]  # fmt: skip
    run = run_grpo(load_config(GrpoConfig, TINY, overrides))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["grpo/policy_version"] for r in rows] == [1.0, 2.0]
    assert rows[0]["grpo/logprob_diff"] < 1e-4 and rows[0]["grpo/clip_frac_on_policy"] == 0.0
    assert all(math.isfinite(r["grpo/kl"]) for r in rows) and rows[1]["grpo/kl"] > 0


def test_train_part_counts_only_the_sde_steps(tmp_path, capsys):
    args = ["grpo", str(TINY), f"runs_root={tmp_path / 'runs'}", f"prompts={PROMPTS}",
            "sampling.time_grid=final_euler", "train_part.kind=step_prefix", "train_part.prefix=4"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "step_prefix needs 1..3 head steps, got 4" in err and "\n" not in err
