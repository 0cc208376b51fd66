"""The proof on a CPU: SFT, DPO and GRPO each make the shapes model follow prompts better.

    python bench/e2e.py [--config configs/e2e/pipeline.yaml] [pipeline key=value ...]

Runs `nsalign pipeline configs/e2e/pipeline.yaml` (resumable: a rerun skips finished stages), then
prints and writes bench/results/e2e_cpu.md: held-out strict accuracy and partial reward of every
checkpoint, each against the pre-trained model with a paired 95% bootstrap CI over prompts (the same
prompts and seeds for every checkpoint), and the wall time of the stages that made it. Then it
evaluates the same checkpoints again on fresh seeds (`--replicate-seed`, never used to choose a setting;
`--replicate-samples` per prompt; seed 0 skips it) and adds that table: some settings were tuned on the
first table's prompts and seeds, so the confirmation shows how much of a gain survives new samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.schema import load_config  # noqa: E402
from dashboard.markdown import markdown_table  # noqa: E402
from jobs.pipeline import Ledger, PipelineConfig, comparison_table, format_delta  # noqa: E402

# checkpoint in the evaluation -> (what it is, the stages whose wall time it cost)
METHODS = {
    "pretrained": ("pre-trained on noisy captions (shapes/assets/pretrained)", []),
    "sft_selected": ("SFT on clean captions, checkpoint chosen by `nsalign select`", ["sft", "select_sft"]),
    "dpo": (
        "Diffusion-DPO + winners' flow-matching loss on shaped-reward pairs (build-prefs on Ray + dpo)",
        ["prefs", "dpo"],
    ),
    "grpo_full": ("GRPO on the shaped reward, every (token, head step) cell trained", ["grpo_full"]),
    "grpo_token_prefix": ("prefix GRPO: first 8 of 16 image tokens, 3:1 prefix/suffix", ["grpo_token_prefix"]),
    "grpo_step_prefix": ("prefix GRPO: first 4 of 10 head steps, 3:1 prefix/suffix", ["grpo_step_prefix"]),
}


def proof_arguments(description: str, config: str, out: str) -> argparse.Namespace:
    """The command line of a proof script: its pipeline config (+ key=value overrides), the result file, and
    the confirmation's evaluation seed and samples per prompt."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=config)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / out))
    p.add_argument("--replicate-seed", type=int, default=2026, help="evaluation seed of the confirmation (0: none)")
    p.add_argument("--replicate-samples", type=int, default=32, help="samples per prompt of the confirmation")
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def run_pipeline(args: argparse.Namespace) -> tuple[int, PipelineConfig | None]:
    """`nsalign pipeline` on the proof's config (resumable) -> (its exit code, its config once it finished, with
    the working directory at the repository root, where the config's relative paths point)."""
    rc = subprocess.call([sys.executable, "-m", "jobs.cli", "pipeline", args.config, *args.overrides], cwd=ROOT)
    if rc != 0:
        return rc, None
    os.chdir(ROOT)
    return 0, load_config(PipelineConfig, args.config, args.overrides)


def provenance(script: str, config_path: str, walls: dict[str, float]) -> str:
    """The line saying what ran where and how long each stage took."""
    stages = ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
    return (f"`python {script}` on {platform.machine()} with {os.cpu_count()} CPU cores; pipeline `{config_path}`; "
            f"total wall time {sum(walls.values()):.0f} s (stages: {stages}).")  # fmt: skip


def main() -> int:
    args = proof_arguments(__doc__.splitlines()[0], "configs/e2e/pipeline.yaml", "e2e_cpu.md")
    rc, config = run_pipeline(args)
    if config is None:
        return rc
    table, rows = comparison_table(config.report)
    walls = Ledger(Path(config.out_dir)).wall_times()
    rewards = config.report.rewards
    header = ["checkpoint", "what", "stages' wall time (s)"]
    header += [col for r in rewards for col in (r, f"{r} vs pretrained [95% CI]")] + ["beats pretrained"]
    lines = []
    for row in rows:
        name = row["checkpoint"]
        what, stages = METHODS.get(name, (name, []))
        wall = sum(walls[s] for s in stages if s in walls)
        cells = [name, what, f"{wall:.0f}" if stages else "-"]
        wins = []
        for r in rewards:
            d = row.get(f"{r}_delta")
            cells += [f"{row[r]:.3f}", format_delta(d)]
            if d is not None:
                wins.append(f"{r}: {'yes' if d[1] > 0 else 'no'}")
        cells.append(", ".join(wins) or "-")
        lines.append(cells)
    selection = Path(config.out_dir) / "runs" / "sft" / "selection.json"
    chosen = json.loads(selection.read_text())["chosen"] if selection.is_file() else "?"
    text = "\n".join([
        "# End-to-end proof on the shapes world (CPU)", "",
        provenance("bench/e2e.py", args.config, walls), "",
        markdown_table(header, lines), "",
        table.split("\n\n")[-1].strip() if "\n\n" in table else "",
        f"SFT selection chose `{chosen}` (runs/e2e/runs/sft/selection.md). 'beats pretrained': the lower end "
        "of the paired 95% CI is above zero.", "",
    ])  # fmt: skip
    if args.replicate_seed:
        text += confirmation(config, args.replicate_seed, args.replicate_samples)
    Path(args.out).write_text(text, encoding="utf-8")
    print("\n" + text)
    from e2e_diagnose import main as diagnose  # bench/ is on sys.path when run as a script

    return diagnose(
        ["--eval", config.report.eval_dir, "--metadata", str(Path(config.world.out) / "data" / "metadata.jsonl")]
    )


def evaluate_again(config: PipelineConfig, seed: int, samples: int) -> tuple[str, str | None]:
    """Re-run the pipeline's evaluate stage with another sample seed (resumable) into <eval_dir>_confirm ->
    (that directory, None) or (its command, a line saying it failed)."""
    stage = next(s for s in config.stages if s.job == "evaluate")
    out_dir = f"{config.report.eval_dir}_confirm"
    cmd = [sys.executable, "-m", "jobs.cli", "evaluate", stage.config, *stage.overrides, f"out_dir={out_dir}",
           f"seed={seed}", f"samples_per_prompt={samples}"]  # fmt: skip
    if subprocess.call(cmd, cwd=ROOT) != 0:
        return out_dir, f"\nConfirmation on seed {seed} failed: `{' '.join(cmd[1:])}`.\n"
    return out_dir, None


def confirmation(config: PipelineConfig, seed: int, samples: int) -> str:
    """Re-run the pipeline's evaluate stage with another sample seed -> its comparison table."""
    out_dir, failed = evaluate_again(config, seed, samples)
    if failed:
        return failed
    table, _ = comparison_table(dataclasses.replace(config.report, eval_dir=out_dir, out=""))
    return "\n".join([
        f"## Confirmation: the same checkpoints on {samples} fresh seeds per prompt (seed {seed}, `{out_dir}`)",
        "", table, "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
