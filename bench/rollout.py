"""Rollout benchmark: the preference-dataset builder measured in one run on this machine (not a test).

* prompts/s of `nsalign build-prefs` in-process vs on Ray with 1 and 2 rollout workers, on the tiny
  and mid presets (random weights, 64x64 images, cfg 7.5, JPEG reward, one shard per prompt).
  Throughput is steady state: prompts after the first shard over the time to the last one, so
  start-up (Ray, actor construction) is reported separately. Ray overhead = in-process / Ray-1 - 1
  on the same thread count;
* peak resident memory of a whole build at 1K vs 10K prompts (in-process, cheapest sampler: one
  16x16 image token, 1 head step, 2 samples per prompt), each in a fresh process;
* a projection, on paper, of the wall time to build the 20K x 16 dataset on 8 and 64 H100s from the
  paper's and our target per-GPU rates (no GPU is measured here; see bench/sampling.py --device).

  python bench/rollout.py [--quick] [--out bench/results/rollout_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as `python bench/rollout.py`, this file's folder comes first on sys.path and would shadow the
# `rollout` package with this very script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from dashboard.markdown import markdown_table  # noqa: E402

CONFIG = ROOT / "configs" / "prefs" / "tiny.yaml"
PROMPT_FILE = ROOT / "prompts" / "pickscore_train.txt"


def build(out: Path, overrides: list[str]) -> dict:
    """Run build-prefs in this process; steady-state prompts/s from its metrics rows, plus wall time."""
    from core.schema import load_config
    from jobs.build_prefs import BuildPrefsConfig, run_build_prefs

    config = load_config(BuildPrefsConfig, CONFIG, [f"out_dir={out}", *overrides])
    t0 = time.time()
    run_build_prefs(config)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = sorted(r["time"] for r in rows)
    steady = (len(times) - 1) * config.prompts_per_shard / (times[-1] - times[0])
    return {"prompts_per_s": steady, "wall_s": wall, "first_shard_s": times[0] - t0, "prompts": len(rows)}


def throughput_rows(preset: str, num_prompts: int, samples: int, steps: int, tmp: Path) -> list[tuple]:
    import ray

    from core.pools import ensure_ray

    common = [f"model={preset}", f"prompts.path={PROMPT_FILE}", f"prompts.limit={num_prompts}",
              f"samples_per_prompt={samples}", "prompts_per_shard=1", f"sampling.num_head_steps={steps}",
              "sampling.cfg_scale=7.5", "pairs.top_k=1", f"rollout.micro_batch_samples={samples}"]  # fmt: skip
    runs = {
        "in-process, 1 thread": ["rollout.pool.kind=local", "rollout.num_threads=1"],
        "Ray, 1 worker x 1 thread": ["rollout.pool.kind=ray", "rollout.pool.num_workers=1",
                                     "rollout.pool.num_cpus_per_worker=1", "rollout.num_threads=1"],
        "in-process, 2 threads": ["rollout.pool.kind=local", "rollout.num_threads=2"],
        "Ray, 2 workers x 1 thread": ["rollout.pool.kind=ray", "rollout.pool.num_workers=2",
                                      "rollout.pool.num_cpus_per_worker=1", "rollout.num_threads=1"],
    }  # fmt: skip
    ensure_ray(num_cpus=2)
    results = {name: build(tmp / f"{preset}-{i}", common + extra) for i, (name, extra) in enumerate(runs.items())}
    ray.shutdown()
    base = results["in-process, 1 thread"]["prompts_per_s"]
    return [
        (preset, name, f"{r['prompts_per_s']:.3f}", f"{r['prompts_per_s'] * samples:.2f}",
         f"{r['prompts_per_s'] / base:.2f}x", f"{r['first_shard_s']:.1f}", f"{r['wall_s']:.1f}")
        for name, r in results.items()
    ]  # fmt: skip


MEMORY_CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import base_model
from core.schema import load_config
from jobs.build_prefs import BuildPrefsConfig, run_build_prefs
cfg = load_config(BuildPrefsConfig, {config!r}, {overrides!r})
t0 = time.time()
run_build_prefs(cfg)
print(json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "wall_s": time.time() - t0}}))
"""


def peak_memory(num_prompts: int, tmp: Path) -> dict:
    """A whole in-process build in a fresh interpreter; its peak RSS (MiB) and wall time.

    Prompts are synthetic and of one length: with real captions the peak follows the longest prompt
    met (the tiny byte-level tokenizer pads a shard to it), which would hide what we measure here.
    """
    prompt_file = tmp / "same_length_prompts.txt"
    if not prompt_file.is_file():
        prompt_file.write_text("".join(f"a photo of object number {i:06d} on a table\n" for i in range(20_000)))
    overrides = [f"out_dir={tmp / f'mem-{num_prompts}'}", f"prompts.path={prompt_file}", f"prompts.limit={num_prompts}",
                 "samples_per_prompt=2", "prompts_per_shard=64", "sampling.image_size=16",
                 "sampling.num_head_steps=1", "pairs.top_k=1", "rollout.pool.kind=local"]  # fmt: skip
    code = MEMORY_CHILD.format(root=str(ROOT), config=str(CONFIG), overrides=overrides)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_mib": result["maxrss_kb"] / 1024, "wall_s": result["wall_s"]}


def projection_rows(ray_overhead: float) -> list[tuple]:
    """Wall time for 20K prompts x 16 images = 320K images at per-GPU rates, with our measured Ray overhead."""
    images = 20_000 * 16
    rates = [("paper pipeline, batch 1 (0.09 img/s/H100)", 0.09), ("our target, 64 in flight (1.5 img/s/H100)", 1.5),
             ("roofline (~3 img/s/H100)", 3.0)]  # fmt: skip
    rows = []
    for label, rate in rates:
        for gpus in (8, 64):
            hours = images / (rate * gpus) * (1 + max(ray_overhead, 0.0)) / 3600
            rows.append((label, gpus, f"{hours:,.1f} h", f"{hours / 24:,.2f} d"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads (smoke run)")
    ap.add_argument("--out", default="bench/results/rollout_cpu.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    import base_model  # noqa: F401

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        n_tiny, n_mid = (8, 4) if args.quick else (24, 8)
        rows = throughput_rows("tiny", n_tiny, 8, 20, tmp) + throughput_rows("mid", n_mid, 8, 20, tmp)
        mem = {n: peak_memory(n, tmp) for n in ((200, 2000) if args.quick else (1000, 10000))}
    ray1 = {r[0]: float(r[4][:-1]) for r in rows if r[1].startswith("Ray, 1")}
    overhead = {preset: 1 / ratio - 1 for preset, ratio in ray1.items()}  # time per prompt, Ray vs in-process
    (small, m_small), (large, m_large) = mem.items()
    text = "\n\n".join([
        "# Rollout benchmark (CPU, 2 cores; build-prefs on random tiny/mid, 64x64, cfg 7.5, 20 head steps, "
        "8 samples per prompt, JPEG reward)",
        markdown_table(("preset", "pool", "prompts/s", "images/s", "vs in-process", "first shard s", "wall s"), rows),
        markdown_table(("measure", "value"), [
            *[(f"Ray overhead: time per prompt, Ray 1 worker vs in-process, 1 thread each ({p})", f"{o * 100:+.1f}%")
              for p, o in overhead.items()],
            (f"peak RSS, {small} prompts", f"{m_small['peak_mib']:.0f} MiB ({m_small['wall_s']:.0f} s)"),
            (f"peak RSS, {large} prompts", f"{m_large['peak_mib']:.0f} MiB ({m_large['wall_s']:.0f} s)"),
            (f"peak RSS ratio {large} / {small} prompts", f"{m_large['peak_mib'] / m_small['peak_mib']:.2f}x"),
        ]),  # fmt: skip
        "## Projection (on paper): 20K prompts x 16 samples = 320K images at 512^2, cfg 7.5, 50 head steps",
        markdown_table(("per-GPU rate", "H100s", "wall time", "days"), projection_rows(max(overhead.values()))),
        "Reading: per-GPU rates are the paper's batch-1 pipeline (0.09 img/s), our target with ~64 images in "
        "flight (1.5 img/s) and the bandwidth roofline (~3 img/s); none is measured here (no GPU). Times add "
        "the worst Ray overhead measured above and exclude reward scoring (ImageReward on a GPU is ~100x "
        "faster than sampling).",
    ])  # fmt: skip
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
