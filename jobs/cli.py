"""`nsalign`: the one entry point. Each subcommand lives in its own module and registers here.

Errors the user can fix (`core.errors.UserError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import UserError

# (module, description); each module defines add_arguments(parser) and run(args) -> int.
# Heavy imports happen inside the modules, only for the subcommand actually run.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("jobs.generate", "sample images from a checkpoint (or `tiny`) into a PNG grid"),
    "rewards": ("jobs.rewards_check", "reward-model utilities: `nsalign rewards check CONFIG`"),
    "sft": ("jobs.sft", "supervised fine-tuning from a YAML config (resumes from `latest`)"),
    "build-prefs": ("jobs.build_prefs", "build a preference dataset: sample, score, pick pairs (resumable)"),
    "dpo": ("jobs.dpo", "Diffusion-DPO on a build-prefs dataset (resumes from `latest`)"),
    "grpo": ("jobs.grpo", "online (prefix-)GRPO: rollout -> rewards -> learner -> weights (resumes)"),
    "evaluate": ("jobs.evaluate", "score checkpoints x held-out prompts x fixed seeds (paired, resumable)"),
    "select": ("jobs.select", "pick a run's checkpoint: rewards, drift guards, paired bootstrap CIs"),
    "pipeline": ("jobs.pipeline", "several jobs in order from one config (the quickstart; resumable)"),
    "shapes-world": ("jobs.shapes_world", "rebuild the shapes world: data, tiny VAE, pre-trained tiny NextStep"),
    "dashboard": ("jobs.dashboard", "static HTML dashboard comparing checkpoints, rewards and preference data"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported (keeps start-up light)."""
    parser = argparse.ArgumentParser(prog="nsalign", description="Post-training workbench for NextStep-1.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def one_line(message: str) -> str:
    """A message that a library spread over several lines (torch, pyarrow, PIL), joined into one."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"nsalign {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nsalign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
