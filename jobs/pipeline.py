"""`nsalign pipeline CONFIG [key=value ...]`: several jobs in order, each from its own config file.

The quickstart is one (configs/quickstart/pipeline.yaml): shapes-world data -> preference dataset with
the rule reward on Ray -> Diffusion-DPO -> a short prefix GRPO -> evaluation of base / DPO / GRPO on
held-out prompts -> checkpoint selection -> the dashboard, then a table of every checkpoint against the
baseline (paired 95% CIs) and the paths of the dashboard and the selection report. bench/e2e.py runs a
longer one (configs/e2e/pipeline.yaml) for the proof table.

Every stage config is loaded and validated (unknown key, wrong type) before the first stage starts.
Each stage runs as its own process (`python -m jobs.cli JOB CONFIG OVERRIDES...`), so a stage
that fails stops the pipeline with its own message, and the jobs' own resume applies: run the same
command again and finished stages are skipped (<out_dir>/pipeline.json records each one with a key of
its command line, its config text and the keys of the stages before it), an interrupted one resumes
from its last checkpoint. A finished stage whose key changed (its config, its overrides or an earlier
stage changed) is refused before anything runs: its outputs would be stale. A second pipeline on the
same out_dir stops at once, naming the first one's pid (<out_dir>/.pipeline.lock; each job also locks
its own directory).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import ConfigError, UserError
from core.files import atomic_write_text, lock_dir
from core.schema import load_config
from dashboard.data import read_eval
from dashboard.markdown import markdown_table
from dashboard.stats import per_prompt_delta_ci
from jobs.cli import SUBCOMMANDS
from shapes.world import WorldConfig

PIPELINE_LOCK = ".pipeline.lock"
Job = Literal["sft", "build-prefs", "dpo", "grpo", "evaluate", "select"]

# job -> its config class in the job's module (jobs.cli.SUBCOMMANDS): every stage's config is
# validated before anything runs
JOB_CONFIGS: dict[str, str] = {
    "sft": "SftConfig",
    "build-prefs": "BuildPrefsConfig",
    "dpo": "DpoConfig",
    "grpo": "GrpoConfig",
    "evaluate": "EvaluateConfig",
    "select": "SelectConfig",
}


@dataclass
class StageConfig:
    name: str  # label in the log, pipeline.json and the timings
    job: Job
    config: str  # the job's YAML
    overrides: list[str] = field(default_factory=list)  # key=value, as on the job's command line


@dataclass
class WorldDataConfig:
    config: str = ""  # shapes world YAML: its data files (seconds) are written first; "" = no world step
    out: str = "runs/shapes_world"


@dataclass
class DashboardStageConfig:
    inputs: list[str] = field(default_factory=list)  # eval dirs, run dirs, preference datasets
    out: str = ""  # "" = no dashboard
    baseline: str = ""  # checkpoint the deltas are taken against ("" = the first one)


@dataclass
class ReportConfig:
    eval_dir: str = ""  # an `nsalign evaluate` output; "" = no table
    baseline: str = ""  # checkpoint name in it ("" = the first one)
    rewards: list[str] = field(default_factory=list)  # [] = every reward except composite
    num_resamples: int = 2000
    out: str = ""  # markdown file for the table ("" = <out_dir>/report.md)


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"  # pipeline.json (stages done, wall times) and report.md
    world: WorldDataConfig = field(default_factory=WorldDataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    dashboard: DashboardStageConfig = field(default_factory=DashboardStageConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # stage name -> extra key=value
    env: dict[str, str] = field(default_factory=lambda: {"OMP_WAIT_POLICY": "PASSIVE"})  # for every stage

    def validate(self, where: str = "config") -> None:
        if not self.stages:
            raise ConfigError(f"{where}.stages: list at least one stage")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"world"} & set(names)))
        if dup:
            raise ConfigError(f"{where}.stages: stage name '{dup[0]}' is used twice (or reserved)")
        unknown = sorted(set(self.stage_overrides) - set(names))
        if unknown:
            raise ConfigError(f"{where}.stage_overrides: no stage named '{unknown[0]}' ({', '.join(names)})")
        if self.report.num_resamples < 100:
            raise ConfigError(f"{where}.report.num_resamples: must be >= 100, got {self.report.num_resamples}")

    def overrides_of(self, stage: StageConfig) -> list[str]:
        """The stage's own overrides, then the pipeline's `stage_overrides` for it."""
        return [*stage.overrides, *self.stage_overrides.get(stage.name, [])]


def check_stage_configs(config: PipelineConfig) -> dict[str, object]:
    """Load and validate every stage's config now, so a typo in the last stage fails before the first runs.
    Returns stage name -> its loaded config."""
    if config.world.config:
        load_config(WorldConfig, config.world.config)
    loaded = {}
    for stage in config.stages:
        try:
            schema = getattr(importlib.import_module(SUBCOMMANDS[stage.job][0]), JOB_CONFIGS[stage.job])
            loaded[stage.name] = load_config(schema, stage.config, config.overrides_of(stage))
        except ConfigError as e:
            raise ConfigError(f"stage '{stage.name}' ({stage.job}): {e}") from None
    return loaded


def stage_key(argv: list[str], config: str) -> str:
    """What a finished stage ran: a hash of its command line and its config file's text."""
    text = Path(config).read_text(encoding="utf-8")
    return hashlib.sha256(json.dumps([argv, text]).encode()).hexdigest()[:16]


def chain_keys(stages: list[tuple[str, list[str], str | None]]) -> list[tuple[str, list[str], str | None]]:
    """Each stage's key also hashes the keys before it: a stage whose inputs changed upstream is not done."""
    out, chain = [], ""
    for name, argv, key in stages:
        if key is not None:
            key = chain = hashlib.sha256(f"{chain}:{key}".encode()).hexdigest()[:16]
        out.append((name, argv, key))
    return out


class Ledger:
    """<out_dir>/pipeline.json: finished stages with their key and wall time, rewritten atomically."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "pipeline.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def done(self, name: str, key: str | None) -> bool:
        entry = self.data["stages"].get(name)
        return key is not None and bool(entry) and entry["key"] == key

    def stale(self, name: str, key: str | None) -> bool:
        """Recorded as finished, but with another key: what it wrote no longer matches its inputs."""
        return key is not None and name in self.data["stages"] and not self.done(name, key)

    def record(self, name: str, key: str | None, wall_s: float) -> None:
        self.data["stages"][name] = {"key": key, "wall_s": round(wall_s, 1)}
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def wall_times(self) -> dict[str, float]:
        return {name: entry["wall_s"] for name, entry in self.data["stages"].items()}


def run_stage(name: str, argv: list[str], env: dict[str, str]) -> float:
    """One job as a child process; its exit code other than 0 stops the pipeline."""
    print(f"pipeline: stage {name}: nsalign {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "jobs.cli", *argv], env={**os.environ, **env})
    if rc != 0:
        raise UserError(f"stage '{name}' (nsalign {argv[0]}) failed with exit code {rc}; fix it and rerun "
                        "the same command: finished stages are skipped")  # fmt: skip
    return time.perf_counter() - start


def comparison_table(config: ReportConfig) -> tuple[str, list[dict]]:
    """Markdown table of every checkpoint vs the baseline, CIs by resampling prompts (seeds stay paired)."""
    res = read_eval(config.eval_dir)
    baseline = config.baseline or res.checkpoints[0]
    if baseline not in res.checkpoints:
        raise UserError(f"report.baseline: {baseline!r} is not in {config.eval_dir} ({', '.join(res.checkpoints)})")
    rewards = config.rewards or [r for r in res.rewards if r != "composite"]
    base = res.checkpoints.index(baseline)
    rows = []
    for c, name in enumerate(res.checkpoints):
        row: dict = {"checkpoint": name}
        for r in rewards:
            if r not in res.scores:
                raise UserError(f"report.rewards: {r!r} was not scored in {config.eval_dir}")
            s = res.scores[r]  # [C, N]
            row[r] = float(s[c].mean())
            if c != base:
                row[f"{r}_delta"] = per_prompt_delta_ci(s[c], s[base], res.prompt_ids, config.num_resamples)
        rows.append(row)
    n_prompts = len(set(res.prompt_ids))
    head = ["checkpoint"] + [f"{r} (mean)" for r in rewards] + [f"{r} vs {baseline} [95% CI]" for r in rewards]
    cells = []
    for row in rows:
        deltas = [format_delta(row.get(f"{r}_delta")) for r in rewards]
        cells.append([row["checkpoint"], *(f"{row[r]:.3f}" for r in rewards), *deltas])
    note = (f"\n{len(res.prompt_ids)} images per checkpoint: {n_prompts} held-out prompts x "
            f"{len(res.prompt_ids) // max(n_prompts, 1)} seeds, the same seeds for every checkpoint; CIs: "
            f"paired bootstrap over prompts ({config.num_resamples} resamples).")  # fmt: skip
    return markdown_table(head, cells) + "\n" + note + "\n", rows


def format_delta(delta: tuple[float, float, float] | None) -> str:
    """(gain, low, high) -> '+0.012 [-0.003, +0.027]'; None (the baseline itself) -> '(baseline)'."""
    return "(baseline)" if delta is None else f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"


def run_pipeline(config: PipelineConfig) -> Path:
    loaded = check_stage_configs(config)
    out = Path(config.out_dir)
    # its own lock file: a stage (another process) may use out_dir itself as its directory
    with lock_dir(out, "pipeline", lock_name=PIPELINE_LOCK):
        ledger = Ledger(out)
        # (name, nsalign argv, key: None = always rerun, as the dashboard must to see what the stages wrote)
        stages: list[tuple[str, list[str], str | None]] = []
        if config.world.config:
            argv = ["shapes-world", config.world.config, "--out", config.world.out, "--data-only"]
            stages.append(("world", argv, stage_key(argv, config.world.config)))
        for s in config.stages:
            argv = [s.job, s.config, *config.overrides_of(s)]
            stages.append((s.name, argv, stage_key(argv, s.config)))
        if config.dashboard.out:
            extra = ["--baseline", config.dashboard.baseline] if config.dashboard.baseline else []
            stages.append(
                ("dashboard", ["dashboard", *config.dashboard.inputs, "--out", config.dashboard.out, *extra], None)
            )
        stages = chain_keys(stages)
        stale = [name for name, _, key in stages if ledger.stale(name, key)]
        if stale:
            raise UserError(
                f"stage '{stale[0]}' finished earlier with other inputs (its command line, its config or an earlier "
                "stage changed since); its outputs would be stale, and a job's own resume keeps what it finds. To redo "
                f"it, delete its outputs and those of every later stage and their entries in {ledger.path}, or use a "
                "new out_dir"
            )
        for name, argv, key in stages:
            if ledger.done(name, key):
                print(f"pipeline: stage {name}: done earlier, skipped", flush=True)
                continue
            ledger.record(name, key, run_stage(name, argv, config.env))
        print("\npipeline: wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in ledger.wall_times().items()))
        if config.report.eval_dir:
            table, _ = comparison_table(config.report)
            report = Path(config.report.out or out / "report.md")
            report.write_text(table, encoding="utf-8")
            print("\n" + table + f"(also in {report})")
        for stage in config.stages:
            if stage.job == "select":
                print(f"pipeline: selection report ({stage.name}): {Path(loaded[stage.name].run_dir) / 'selection.md'}")
        if config.dashboard.out:
            print(f"pipeline: dashboard: {Path(config.dashboard.out) / 'index.html'} (open it in a browser; "
                  f"`nsalign dashboard ... --serve` serves it on 127.0.0.1)")  # fmt: skip
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML (configs/quickstart/pipeline.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config")


def run(args: argparse.Namespace) -> int:
    config = load_config(PipelineConfig, args.config, args.overrides)
    names = (["world"] if config.world.config else []) + [s.name for s in config.stages]
    print(f"pipeline: {' -> '.join(names)}{' -> dashboard' if config.dashboard.out else ''}", flush=True)
    run_pipeline(config)
    return 0
