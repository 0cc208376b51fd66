"""`nsalign select`: the best-reward checkpoint that fails a drift guard is passed over."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from base_model.checkpoint import build_random, read_state_dict, save_checkpoint
from core.schema import load_config
from jobs.select import GuardsConfig, SelectConfig, guard_checks, run_select, soup_weights
from rollout.eval_format import thumbnail_png, write_rows
from rollout.evaluation import prepare_out_dir
from rollout.prompts import load_prompts

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "select" / "tiny.yaml"
PROMPTS = ["a red circle", "a blue square", "a green star"]


def make_tiny_run(run: Path, steps: tuple[int, ...] = (1, 2), noise: float = 0.05) -> Path:
    """An SFT-like run dir without training: the tiny preset (seed 0) perturbed a little more per step."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run_name": run.name, "model": "tiny"}))
    for step in steps:
        bundle = build_random("tiny", seed=0)
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in bundle.model.parameters():
                p.add_(noise * step * torch.randn(p.shape, generator=gen))
        save_checkpoint(bundle, run / f"step_{step:06d}" / "model")
        (run / f"step_{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    with (run / "metrics.jsonl").open("w") as f:
        for s in range(1, max(steps) + 1):
            f.write(json.dumps({"step": s, "time": 0.0, "train/loss": 2.0 / s, "sft/flow_matching": 1.5 / s}) + "\n")
    return run


def _config(tmp_path: Path, run: Path, *extra: str) -> SelectConfig:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    overrides = [f"run_dir={run}", f"eval.prompts.path={prompts}", "primary=jpeg", "num_resamples=200", *extra]
    return load_config(SelectConfig, CONFIG, overrides)


def _write_scores(config: SelectConfig, run: Path, gains: dict[str, float], collapsed: set[str]) -> None:
    """Hand-made evaluation results: jpeg = gain + 0.1 * sample index; `collapsed` checkpoints draw the
    same image for every seed of a prompt (zero diversity); the others draw random images."""
    out = prepare_out_dir(config.eval, run / "select" / "eval")
    rng = np.random.default_rng(0)
    names = [r.name for r in config.eval.rewards.rewards] + ["composite"]
    for name, gain in gains.items():
        rows = []
        for p in load_prompts(config.eval.prompts.path):
            same = torch.from_numpy(rng.integers(0, 255, (3, 32, 32), dtype=np.uint8))
            for s in range(config.eval.samples_per_prompt):
                img = same if name in collapsed else torch.from_numpy(rng.integers(0, 255, (3, 32, 32), dtype=np.uint8))
                score = gain + 0.1 * s
                rows.append({"checkpoint": name, "prompt_id": p.id, "prompt": p.text, "sample_index": s, "seed": s,
                             "scores": {n: score for n in names}, "thumbnail": thumbnail_png(img, 32)})  # fmt: skip
        write_rows(out / "scores" / name / "shard-000000.parquet", rows, names)


def test_best_reward_checkpoint_failing_the_diversity_guard_is_not_chosen(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    config = _config(tmp_path, run, "soup.enabled=false", "heldout.path=")
    _write_scores(config, run, {"base": 0.0, "step_000001": 1.0, "step_000002": 2.0}, collapsed={"step_000002"})
    run_select(config)  # every shard exists: nothing is sampled
    report = json.loads((run / "selection.json").read_text())
    assert report["ranking"] == ["step_000002", "step_000001", "base"]
    figs = report["candidates"]
    assert figs["step_000002"]["diversity"] == 0.0
    assert any("diversity" in f for f in figs["step_000002"]["failed_guards"])
    assert report["chosen"] == "step_000001" and not figs["step_000001"]["failed_guards"]
    assert figs["step_000001"]["win_rate_vs_base"] == 1.0
    assert figs["step_000001"]["delta_vs_base"] == pytest.approx(1.0)
    assert figs["step_000001"]["delta_ci"] == pytest.approx([1.0, 1.0])  # every row gains exactly 1
    assert (run / "selected").read_text() == "step_000001/model\n"
    md = (run / "selection.md").read_text()
    assert "**Chosen: `step_000001`**" in md and "step_000002 (diversity" in md
    assert "no EMA candidate" in md and "not measured" in md


def test_ema_weights_become_a_candidate(tmp_path):
    run = make_tiny_run(tmp_path / "run", steps=(1,))
    save_checkpoint(build_random("tiny", seed=0), run / "step_000001" / "ema")
    config = _config(tmp_path, run, "soup.enabled=false")
    _write_scores(config, run, {"base": 0.0, "step_000001": -1.0, "ema": 0.5}, collapsed=set())
    run_select(config)
    report = json.loads((run / "selection.json").read_text())
    assert report["chosen"] == "ema" and report["candidates"]["ema"]["path"].endswith("step_000001/ema")
    assert report["candidates"]["step_000001"]["failed_guards"] == ["win rate vs base 0.000 < 0.5"]
    assert (run / "selected").read_text() == "step_000001/ema\n"


def test_guards_on_hand_made_figures():
    base = {"fm_loss": 1.0, "diversity": 0.2, "win_rate_vs_base": 0.5}
    g = GuardsConfig(max_fm_loss_increase=0.1, max_diversity_drop=0.3, min_win_rate=0.5)
    assert guard_checks({"fm_loss": 1.09, "diversity": 0.15, "win_rate_vs_base": 0.5}, base, g) == []
    failed = guard_checks({"fm_loss": 1.2, "diversity": 0.1, "win_rate_vs_base": 0.4}, base, g)
    assert [f.split()[0] for f in failed] == ["held-out", "diversity", "win"]
    assert guard_checks({"fm_loss": None, "diversity": float("nan"), "win_rate_vs_base": 0.6}, base, g) == []


def test_soup_is_the_mean_of_the_ingredients(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    soup_weights([str(run / "step_000001" / "model"), str(run / "step_000002" / "model")], tmp_path / "soup")
    a, b = read_state_dict(run / "step_000001" / "model"), read_state_dict(run / "step_000002" / "model")
    soup = read_state_dict(tmp_path / "soup")
    for k in list(soup)[:5]:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2)
