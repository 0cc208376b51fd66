"""Learner benchmark: each job's optimizer step measured in one run on this machine (not a test).

  * samples/s of an SFT, a Diffusion-DPO and a GRPO step on the tiny and mid presets (random weights,
    64x64 images = 16 tokens), DeepSpeed world 1 on the CPU with ZeRO 0, 2 and 3. Each job runs through
    `nsalign <job>` with its tiny config and overrides; the time per step is read from the run's own
    metrics.jsonl (steps after the first, so DeepSpeed start-up is excluded). For GRPO the step is the
    whole online iteration; its learning part alone is reported from the job's `time/learn_s`.
  * the share of a GRPO iteration spent in rollout, reward, learning and weight sync (`time/*_share`).
Samples are images for SFT and GRPO, and pairs (two images each) for DPO.

    python bench/learners.py [--quick] [--out bench/results/learners_cpu.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # see bench/rollout.py

from dashboard.markdown import markdown_table  # noqa: E402


def sft_data(path: Path, num_rows: int = 32) -> Path:
    """(caption, PNG) rows of flat-coloured squares, the SFT job's input format."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    captions, images = [], []
    for i in range(num_rows):
        colour = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, (64, 64, 3)).astype(np.uint8)).save(buf, format="PNG")
        captions.append(f"a square of colour {colour.tolist()} number {i}")
        images.append(buf.getvalue())
    pq.write_table(pa.table({"caption": captions, "image": images}), path)
    return path


def prefs_data(out: Path) -> Path:
    """A small build-prefs dataset (tiny model, JPEG reward) for the DPO step."""
    from jobs.cli import main

    prompts = out.parent / "prompts.txt"
    prompts.write_text("".join(f"a scene with {i} coloured shapes\n" for i in range(32)))
    args = ["build-prefs", str(ROOT / "configs/prefs/tiny.yaml"), f"out_dir={out}", f"prompts.path={prompts}",
            "samples_per_prompt=4", "pairs.top_k=1", "sampling.num_head_steps=4",
            "rollout.pool.kind=local"]  # fmt: skip
    assert main(args) == 0
    return out


def step_times(run: Path) -> list[float]:
    """Seconds between consecutive logged steps (the first step, with start-up, is left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time"] for r in rows]
    return [b - a for a, b in zip(times, times[1:])], rows


def run_job(job: str, overrides: list[str]) -> None:
    from jobs.cli import main

    config = ROOT / "configs" / job / "tiny.yaml"
    if main([job, str(config), *overrides]) != 0:
        raise SystemExit(f"bench: nsalign {job} failed")


def measure(tmp: Path, preset: str, zero: int, steps: int, data: dict[str, Path]) -> list[tuple]:
    common = [f"model={preset}", f"runs_root={tmp / 'runs'}", f"steps={steps}", "checkpoint_every=1000",
              f"learner.zero_stage={zero}", f"learner.total_steps={steps}"]  # fmt: skip
    jobs = {
        "sft": (["data.image_size=64", "micro_batch_samples=4", "micro_batches_per_step=2",
                 f"data.path={data['sft']}"], 8),
        "dpo": ([f"data.path={data['prefs']}", "data.eval_fraction=0.0", "pairs_per_step=8", "micro_batch_pairs=4"], 8),
        "grpo": (["prompts_per_step=2", "samples_per_prompt=4", "micro_batch_samples=8"], 8),
    }  # fmt: skip
    rows = []
    for job, (extra, samples) in jobs.items():
        name = f"{job}-{preset}-z{zero}"
        run_job(job, [f"run_name={name}", *common, *extra])
        gaps, metrics = step_times(tmp / "runs" / name)
        per_step = sum(gaps) / len(gaps)
        learn = ""
        if job == "grpo":
            learn_s = [r["time/learn_s"] for r in metrics[1:] if "time/learn_s" in r]
            learn = f"{samples / (sum(learn_s) / len(learn_s)):.2f}" if learn_s else "n/a"
        rows.append((job, preset, f"ZeRO-{zero}", samples, f"{per_step:.2f}", f"{samples / per_step:.2f}", learn))
    return rows


def grpo_shares(tmp: Path, preset: str) -> tuple:
    _, metrics = step_times(tmp / "runs" / f"grpo-{preset}-z2")
    parts = ("rollout", "reward", "learn", "sync")
    share = {p: [r.get(f"time/{p}_share") for r in metrics[1:] if f"time/{p}_share" in r] for p in parts}
    return (preset, *[f"{100 * sum(v) / len(v):.0f}%" if v else "n/a" for v in share.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, ZeRO-2 only, 3 steps")
    ap.add_argument("--out", default="bench/results/learners_cpu.md")
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    import base_model  # noqa: F401

    torch.set_num_threads(2)
    presets, stages, steps = (["tiny"], [2], 3) if args.quick else (["tiny", "mid"], [0, 2, 3], 4)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = {"sft": sft_data(tmp / "sft.parquet"), "prefs": prefs_data(tmp / "prefs")}
        rows = [r for p in presets for z in stages for r in measure(tmp, p, z, steps, data)]
        shares = [grpo_shares(tmp, p) for p in presets]
    text = "\n\n".join([
        "# Learner benchmark (CPU, 2 threads, DeepSpeed world 1; random tiny/mid, 64x64 = 16 tokens)",
        markdown_table(
            ("job", "preset", "ZeRO", "samples/step", "s/step", "samples/s", "GRPO learn-only samples/s"), rows
        ),
        "## Where a GRPO iteration goes (ZeRO-2; 2 prompts x 4 samples, 4 head steps, JPEG reward)",
        markdown_table(("preset", "rollout", "reward", "learn", "weight sync"), shares),
        "Samples: images for SFT and GRPO, pairs for DPO (each pair = 2 images, policy + reference passes). "
        "GRPO's s/step is the whole online iteration (rollout with chains, reward, re-scoring + update, "
        "weight broadcast).",
    ])  # fmt: skip
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
