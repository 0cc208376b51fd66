"""`nsalign evaluate CONFIG [key=value ...]`: checkpoints x held-out prompts x fixed seeds -> scores.

The checkpoints are named in the config (directories, presets, run directories, `selected` files) or taken
from a run directory; the work is rollout/evaluation.py's. Every checkpoint samples the same prompts
with the same per-sample seeds and sampler settings, so any two checkpoints' scores are paired row by row.

    <out>/config.yaml                         the evaluation settings (a re-run must match them)
    <out>/scores/<checkpoint>/shard-000000.parquet   one file per (checkpoint, block of prompts)
    <out>/eval.json                           checkpoints (name -> path), prompts, rewards, sampler

Like build-prefs, a shard is written atomically, so "the file exists" means "scored": re-running
skips it, and adding checkpoints to the config scores only the new ones. Rollouts run on the rollout
pool (in-process or Ray), scores on the reward pool.

With and without Self-CoT: `self_cot` names the entries sampled with Self-CoT (sampling.cot says how; the
reasoning lands in each row's `reasoning` column). Listing one checkpoint twice pairs the two modes on the
same prompts and seeds, e.g. `checkpoints: [plain=dir, cot=dir]` + `self_cot: [cot]`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from base_model.checkpoint import load_config as load_model_config
from base_model.config import RANDOM_PRESETS
from base_model.sequence import check_sequence_fits, model_max_positions
from core.errors import ConfigError, UserError
from core.runs import model_dir_of
from core.schema import load_config
from rollout.eval_format import SCORES_DIR
from rollout.evaluation import EvalSettings, checkpoint_name, evaluate_checkpoints, run_checkpoints


@dataclass
class EvaluateConfig(EvalSettings):
    out_dir: str = "runs/eval"
    checkpoints: list[str] = field(default_factory=list)  # dirs, presets, or `name=dir` to name one; a run
    # dir means its `latest` checkpoint, `<run>/selected` the checkpoint `nsalign select` chose
    run_dir: str | None = None  # also every step_*/model of this run directory
    # names of entries (of `checkpoints`, or a run_dir's step_*) sampled with Self-CoT (sampling.cot); the
    # others are sampled without it, on the same prompts and seeds
    self_cot: list[str] = field(default_factory=list)

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if not self.checkpoints and not self.run_dir:
            raise ConfigError(f"{where}.checkpoints: name at least one checkpoint (or set run_dir)")
        if self.self_cot and self.sampling.self_cot:
            raise ConfigError(f"{where}.self_cot: sampling.self_cot is true (every entry uses Self-CoT); "
                              "set one or the other")  # fmt: skip
        entries = [entry(spec) for spec in self.checkpoints]
        if not self.run_dir:  # a run's step_* names are known once it is read (resolve_checkpoints)
            check_self_cot_names(self.self_cot, [name for name, _ in entries], where)
        cot_tokens = self.sampling.cot.text_tokens  # template + reasoning
        for name, spec in entries:  # run directories are resolved (and read) later
            check_sequence_fits(
                self.sampling.max_prompt_tokens,
                (self.sampling.image_size,) * 2,
                model_max_positions(spec),
                f"{where}.sampling.max_prompt_tokens",
                text_tokens=cot_tokens if self.sampling.self_cot or name in self.self_cot else 0,
            )


def entry(spec: str) -> tuple[str, str]:
    """One `checkpoints` entry -> (name, spec): `name=dir` or a bare dir / preset named by checkpoint_name."""
    return tuple(spec.split("=", 1)) if "=" in spec else (checkpoint_name(spec), spec)


def check_self_cot_names(self_cot: list[str], names: list[str], where: str) -> None:
    """ConfigError naming the first `self_cot` name that is not a checkpoint entry."""
    for name in self_cot:
        if name not in names:
            raise ConfigError(f"{where}.self_cot: {name!r} is not a checkpoint entry ({', '.join(names)}); "
                              "name entries with `name=dir`")  # fmt: skip


def resolve_checkpoints(config: EvaluateConfig) -> list[tuple[str, str]]:
    """(name, spec) pairs from the config, names unique, every directory checked before anything runs."""
    # run directories -> their latest checkpoint, `<run>/selected` -> the chosen one
    pairs = [(name, model_dir_of(spec)) for name, spec in map(entry, config.checkpoints)]
    if config.run_dir:
        pairs += run_checkpoints(config.run_dir)
    names = [n for n, _ in pairs]
    check_self_cot_names(config.self_cot, names, "config")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"checkpoint name {dup[0]!r} is used twice; name them with `name=dir`")
    for name, spec in pairs:
        if not name or "/" in name:
            raise UserError(f"checkpoint name {name!r} must be non-empty and without '/'")
        if spec not in RANDOM_PRESETS:
            load_model_config(spec)  # missing directory or config.json -> CheckpointError naming it
    return pairs


def run_evaluate(config: EvaluateConfig) -> Path:
    return evaluate_checkpoints(config, config.out_dir, resolve_checkpoints(config), self_cot=config.self_cot)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/evaluate/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prompts.limit=50 'checkpoints=[tiny]'")


def run(args: argparse.Namespace) -> int:
    config = load_config(EvaluateConfig, args.config, args.overrides)
    out = run_evaluate(config)
    print(f"evaluate: scores in {out / SCORES_DIR}")
    return 0
