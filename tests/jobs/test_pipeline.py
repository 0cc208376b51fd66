"""`nsalign pipeline`: stage configs validated before anything runs, finished stages skipped on a rerun,
the comparison table; and (slow) the quickstart itself on a reduced budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]
EVAL_TINY = ROOT / "configs" / "evaluate" / "tiny.yaml"


def _pipeline(tmp_path: Path, stages: list[dict], **extra) -> str:
    config = {"out_dir": str(tmp_path / "pipe"), "stages": stages, **extra}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def _eval_stage(tmp_path: Path, *extra: str) -> dict:
    overrides = [f"out_dir={tmp_path / 'eval'}", "checkpoints=[a=tiny,b=tiny]", "prompts.limit=2",
                 "samples_per_prompt=2", "sampling.num_head_steps=2", "rewards.rewards=[{name: jpeg, type: jpeg}]",
                 *extra]  # fmt: skip
    return {"name": "eval", "job": "evaluate", "config": str(EVAL_TINY), "overrides": overrides}


@pytest.mark.parametrize(
    "stage_extra, pipeline_extra, message",
    [
        (["samples_per_promt=2"], {}, "stage 'eval' (evaluate): "),
        ([], {"stage_overrides": {"evl": ["steps=1"]}}, "no stage named 'evl'"),
        ([], {"report": {"num_resamples": 10}}, "report.num_resamples"),
    ],
)
def test_bad_configs_exit_2_before_any_stage_runs(tmp_path, capsys, stage_extra, pipeline_extra, message):
    path = _pipeline(tmp_path, [_eval_stage(tmp_path, *stage_extra)], **pipeline_extra)
    assert main(["pipeline", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsalign pipeline: error:") and message in err[0], err
    if stage_extra:  # an unknown key inside a stage's config is named, with the stage, before anything runs
        assert "unknown key 'samples_per_promt'" in err[0]
    assert not (tmp_path / "pipe").exists() and not (tmp_path / "eval").exists()


def test_finished_stages_are_skipped_and_the_table_pairs_checkpoints(tmp_path, capfd):
    report = {"eval_dir": str(tmp_path / "eval"), "baseline": "a", "rewards": ["jpeg"]}
    path = _pipeline(tmp_path, [_eval_stage(tmp_path)], report=report)
    assert main(["pipeline", path]) == 0
    first = capfd.readouterr().out
    assert "stage eval: nsalign evaluate" in first
    # two copies of the same model under the same seeds: every paired difference is exactly 0
    assert "| b | " in first and "+0.000 [+0.000, +0.000]" in first
    ledger = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert list(ledger["stages"]) == ["eval"] and ledger["stages"]["eval"]["wall_s"] > 0
    assert main(["pipeline", path]) == 0
    assert "stage eval: done earlier, skipped" in capfd.readouterr().out
    # a changed stage is not "done", and its outputs are stale: refused before anything runs
    path = _pipeline(tmp_path, [_eval_stage(tmp_path, "thumbnail_size=32")], report=report)
    assert main(["pipeline", path]) == 2
    out, err = capfd.readouterr()
    assert "stage 'eval' finished earlier with other inputs" in err and "nsalign evaluate" not in out


def test_a_stage_after_a_changed_stage_is_stale(tmp_path, capfd):
    # "later" runs after "first"; if "first" is redone with other inputs (its entry forgotten, as the message
    # says), "later" is no longer done either: its key chains the keys before it
    first, later = _eval_stage(tmp_path), {**_eval_stage(tmp_path), "name": "later"}
    later["overrides"] = [o.replace(str(tmp_path / "eval"), str(tmp_path / "eval2")) for o in later["overrides"]]
    assert main(["pipeline", _pipeline(tmp_path, [first, later])]) == 0
    ledger_path = tmp_path / "pipe" / "pipeline.json"
    ledger = json.loads(ledger_path.read_text())
    del ledger["stages"]["eval"]
    ledger_path.write_text(json.dumps(ledger))
    first["overrides"] = [*first["overrides"], f"out_dir={tmp_path / 'eval_new'}"]
    capfd.readouterr()
    assert main(["pipeline", _pipeline(tmp_path, [first, later])]) == 2
    assert "stage 'later' finished earlier with other inputs" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_quickstart_on_a_reduced_budget_writes_the_dashboard(tmp_path):
    """The README's main command, every stage, with small budgets (about 2 minutes)."""
    for name in ("configs", "shapes"):
        (tmp_path / name).symlink_to(ROOT / name)
    small = (
        "stage_overrides={prefs: [prompts.limit=8, samples_per_prompt=8, prompts_per_shard=4], "
        "dpo: [steps=4, checkpoint_every=2, eval_every=2], "
        "grpo: [steps=2, checkpoint_every=1, prompts_per_step=2, micro_batch_samples=16], "
        "eval: [prompts.limit=4, samples_per_prompt=2], "
        "select: [eval.prompts.limit=4, eval.samples_per_prompt=2, heldout.max_pairs=8]}"
    )
    cmd = [sys.executable, "-m", "jobs.cli", "pipeline", "configs/quickstart/pipeline.yaml", small]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    page = tmp_path / "runs" / "quickstart" / "dashboard" / "index.html"
    assert page.is_file() and page.stat().st_size > 10_000
    assert f"dashboard: {Path('runs/quickstart/dashboard/index.html')}" in out.stdout
    assert "selection report (select): runs/quickstart/runs/dpo/selection.md" in out.stdout
    assert (tmp_path / "runs" / "quickstart" / "runs" / "dpo" / "selected").is_file()
    table = (tmp_path / "runs" / "quickstart" / "report.md").read_text()
    assert "| dpo |" in table and "| grpo_prefix |" in table
