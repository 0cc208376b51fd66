"""`nsalign rewards check CONFIG [key=value ...] [--load]`: are the configured rewards' files here?

Lists every configured reward with each file it reads: present or MISSING, and where the published
file comes from. With --load, also builds each reward (reads the files, checks every key and shape).
Problems print one line per reward on stderr and exit with code 2. Nothing is ever downloaded, and a
reward configured with `init: random` is reported as such, loudly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from core.errors import ConfigError, UserError
from core.schema import apply_override, from_dict, load_config
from rewards.base import RequiredFile, RewardsConfig, RewardSpec, build_reward


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`nsalign rewards check ...` arguments."""
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="list configured rewards and whether their files are present")
    check.add_argument("config", help="YAML file with a rewards config (a `rewards:` list at the top level)")
    check.add_argument("overrides", nargs="*", help="key=value overrides, e.g. device=cuda")
    check.add_argument("--section", default=None, help="dotted key of the rewards config inside a job config")
    check.add_argument("--load", action="store_true", help="also load every reward and check its keys")
    check.add_argument("--device", default="cpu", help="where --load builds the rewards (default: cpu)")


def read_rewards_config(path: str, overrides: list[str], section: str | None) -> RewardsConfig:
    """The RewardsConfig at the top of `path`, or under the dotted `section` of a larger config."""
    if section is None:
        return load_config(RewardsConfig, path, overrides)
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for item in overrides:
        apply_override(data, item)
    for part in section.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{path}: no section '{section}'")
        data = data[part]
    return from_dict(RewardsConfig, data, where=f"{path}:{section}")


def check_reward(spec: RewardSpec, load: bool, device: str) -> str | None:
    """Print one reward's status; return a one-line problem description, or None if it is ready."""
    config = spec.family_config(spec.name)
    note = (
        "  RANDOM WEIGHTS (init: random; tests and benchmarks only)" if getattr(config, "init", "") == "random" else ""
    )
    print(f"  {spec.name}  [type {spec.type}, weight {spec.weight}]{note}")
    missing: list[RequiredFile] = []
    for f in config.files():
        present = Path(f.path).is_file()
        print(f"    {'ok     ' if present else 'MISSING'}  {label(f)}  {f.path}  <- {f.source}")
        missing += [] if present else [f]
    if missing:
        return "; ".join(f"{label(f)}: {f.path} missing (expected {f.expected}; from {f.source})" for f in missing)
    if load:
        t0 = time.perf_counter()
        try:
            build_reward(spec, device)
        except UserError as e:
            print(f"    LOAD FAILED: {e}")
            return str(e)
        checked = ", files read and every key and shape checked" if config.files() and not note else ""
        print(f"    built in {time.perf_counter() - t0:.1f} s{checked}")
    return None


def label(f: RequiredFile) -> str:
    """`params.<key>` for files the config names; '(package)' for files inside an installed package."""
    return f"params.{f.key}" if f.key else "(package)"


def run(args: argparse.Namespace) -> int:
    """Report every configured reward; 0 when all are ready, 2 otherwise."""
    config = read_rewards_config(args.config, args.overrides, args.section)
    print(f"rewards in {args.config} (device {config.device}, dtype {config.dtype}):")
    problems = {s.name: check_reward(s, args.load, args.device) for s in config.rewards}
    problems = {name: p for name, p in problems.items() if p is not None}
    for name, problem in problems.items():
        print(f"nsalign rewards check: reward '{name}': {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"all {len(config.rewards)} rewards ready" + (" and loadable" if args.load else " (files present)"))
    return 0
