"""The Self-CoT proof on a CPU: DPO on a preference set whose samples write their plan first, against DPO on
the image-only set of the same prompts, from the shapes model that learnt to plan (shapes/assets/pretrained_cot).

    python bench/e2e_self_cot.py [--config configs/e2e_cot/pipeline.yaml] [pipeline key=value ...]

Runs `nsalign pipeline configs/e2e_cot/pipeline.yaml` (resumable), then writes bench/results/e2e_self_cot.md:
held-out strict accuracy and partial reward of every entry against image-only DPO, and against the plan-writing
model sampled plain, each with a paired 95% bootstrap CI over prompts (the same prompts and image seeds for
every entry, Self-CoT or not), then the same entries on fresh seeds (`--replicate-seed`, 0 skips it).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e import evaluate_again, proof_arguments, provenance, run_pipeline  # noqa: E402  (bench/ is on sys.path as a script)

from jobs.pipeline import Ledger, PipelineConfig, comparison_table  # noqa: E402

WHAT = {
    "pretrained_cot": "the plan-writing shapes model, sampled plain (no plan)",
    "pretrained_cot+self_cot": "the same weights, sampled with Self-CoT (its greedy plan, then the image)",
    "dpo_image": "Diffusion-DPO on the image-only preference set (plain sampling)",
    "dpo_cot": (
        "Diffusion-DPO on the Self-CoT set (plans drawn at temperature 1), each image scored after its own plan "
        "(Self-CoT sampling)"
    ),
    "dpo_cot_text": "as dpo_cot, plus the plan's own DPO log-ratio (text_loss, text_beta 0.1)",
}


def tables(config: PipelineConfig, eval_dir: str) -> str:
    """The comparison against image-only DPO, then against the plain plan-writing model."""
    out = []
    for baseline in ("dpo_image", "pretrained_cot"):
        report = dataclasses.replace(config.report, eval_dir=eval_dir, baseline=baseline, out="")
        table, _ = comparison_table(report)
        out += [f"### Against `{baseline}`", "", table.strip(), ""]
    return "\n".join(out)


def main() -> int:
    args = proof_arguments(__doc__.splitlines()[0], "configs/e2e_cot/pipeline.yaml", "e2e_self_cot.md")
    rc, config = run_pipeline(args)
    if config is None:
        return rc
    walls = Ledger(Path(config.out_dir)).wall_times()
    lines = [
        "# Self-CoT proof on the shapes world (CPU)", "",
        provenance("bench/e2e_self_cot.py", args.config, walls), "",
        "| entry | what |", "|---|---|", *(f"| {k} | {v} |" for k, v in WHAT.items()), "",
        "## 64 held-out prompts x 16 seeds", "", tables(config, config.report.eval_dir),
    ]  # fmt: skip
    if args.replicate_seed:
        lines += [confirmation(config, args.replicate_seed, args.replicate_samples)]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print("\n" + text)
    return 0


def confirmation(config: PipelineConfig, seed: int, samples: int) -> str:
    """The evaluate stage again on fresh seeds (resumable) -> its two comparison tables."""
    out_dir, failed = evaluate_again(config, seed, samples)
    if failed:
        return failed
    return "\n".join([
        f"## Confirmation: {samples} fresh seeds per prompt (seed {seed}, `{out_dir}`)", "", tables(config, out_dir),
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
