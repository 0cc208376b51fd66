"""Rebuild the shapes world into one directory: data, a trained tiny VAE, a pre-trained tiny NextStep.

    python -m jobs.shapes_world configs/shapes_world/world.yaml --out runs/shapes_world [key=value ...]
    nsalign shapes-world configs/shapes_world/world.yaml --out runs/shapes_world

OUT/data/      pretrain.parquet (noisy captions), sft.parquet (clean), cot.parquet (clean, + each image's
               plan: Self-CoT SFT), heldout.parquet (clean, eval-pool captions: drift guards only), prefs.jsonl,
               eval.jsonl,
               metadata.jsonl (GenEval records of every caption of the world: the rule reward's table)
OUT/vae/       the VAE in the published layout (checkpoint.pt + config.json)
OUT/init/      random NextStep of `model` sizes + that VAE (the SFT job's `model:`)
OUT/runs/pretrain/   the `nsalign sft` run of `pretrain_config` (configs/shapes/pretrain.yaml)
OUT/pretrained/      its last checkpoint, copied (published layout)
OUT/runs/cot/        the `nsalign sft` run of `cot_config` (configs/shapes/cot.yaml): Self-CoT SFT of OUT/pretrained
OUT/pretrained_cot/  its last checkpoint, copied (skipped with --skip-cot or an empty cot_config)
OUT/rewards.yaml     a RewardsConfig: the rule reward (`type: geneval`, shapes detector)
OUT/eval_pretrained.json, OUT/samples_pretrained.png: held-out strict/partial scores and a sample grid
OUT/build.json       wall and CPU seconds of every stage
Every stage is seeded; the same config on the same machine gives the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

from base_model.checkpoint import build_random, load_checkpoint, save_checkpoint
from base_model.generate import generate_images, make_grid
from base_model.sampler import SamplingConfig
from base_model.vae import load_vae, save_vae
from core.errors import UserError
from core.runs import latest_checkpoint
from core.schema import apply_override, from_dict, load_config, to_dict
from rewards.base import RewardsConfig, build_reward
from rollout.prompts import load_prompts
from shapes.train_vae import train_vae
from shapes.world import WorldConfig, WorldEvalConfig, rewards_config, world_images, write_data


def init_model(config: WorldConfig, vae_dir: Path, out: Path) -> Path:
    """Random NextStep of config.model sizes + the trained VAE, saved in the published layout."""
    bundle = build_random("tiny", seed=config.seed, overrides=to_dict(config.model))
    bundle.vae = load_vae(vae_dir)
    return save_checkpoint(bundle, out)


def pretrain(config: WorldConfig, init_dir: Path, data: Path, out: Path) -> Path:
    """`nsalign sft` on the noisy pre-training split, in a process of its own (as a pipeline stage runs);
    returns the last checkpoint's model directory."""
    return sft_stage("pre-training", config.pretrain_config, [f"model={init_dir}", f"data.path={data}",
                     f"runs_root={out}", *config.pretrain_overrides])  # fmt: skip


def cot_sft(config: WorldConfig, pretrained: Path, data: Path, out: Path) -> Path:
    """`nsalign sft` of `cot_config` from the pre-trained model on the plans split (Self-CoT SFT); returns
    the last checkpoint's model directory."""
    return sft_stage("Self-CoT SFT", config.cot_config, [f"model={pretrained}", f"data.path={data}",
                     f"runs_root={out}", *config.cot_overrides])  # fmt: skip


def sft_stage(what: str, config_path: str, overrides: list[str]) -> Path:
    """`nsalign sft CONFIG overrides` in a process of its own -> the last checkpoint's model directory."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    for item in overrides:
        apply_override(raw, item)
    argv = [sys.executable, "-m", "jobs.cli", "sft", config_path, *overrides]
    if subprocess.call(argv) != 0:
        raise UserError(f"shapes-world: the {what} run ({' '.join(argv[2:])}) failed; its error is above")
    return latest_checkpoint(Path(raw.get("runs_root", "runs")) / raw.get("run_name", "sft")) / "model"


def evaluate(config: WorldEvalConfig, model_dir: Path, prompts_file: Path, metadata: Path, out: Path) -> dict:
    """Held-out strict / partial scores of a checkpoint (eval prompts x seeds) and a sample grid PNG."""
    bundle = load_checkpoint(model_dir)
    prompts = [p.text for p in load_prompts(prompts_file)]
    sampling = SamplingConfig(image_size=64, cfg_scale=config.cfg_scale, num_head_steps=config.num_head_steps)
    rows = [(p, s) for p in prompts for s in range(config.seeds_per_prompt)]
    images = generate_images(bundle, [p for p, _ in rows], [s for _, s in rows], sampling, config.batch_size)
    reward = build_reward(from_dict(RewardsConfig, rewards_config(metadata)).rewards[0])
    scores = reward(images, [p for p, _ in rows])
    strict, partial = scores.components["strict"], scores.components["partial"]
    result = {
        "checkpoint": str(model_dir), "num_images": len(rows), "strict": float(strict.mean()),
        "partial": float(partial.mean()), "per_prompt_strict": {},
    }  # fmt: skip
    for (p, _), s in zip(rows, strict.tolist()):
        result["per_prompt_strict"][p] = result["per_prompt_strict"].get(p, 0.0) + s / config.seeds_per_prompt
    grid_rows = [(p, s) for p in prompts[: config.grid_prompts] for s in range(4)]
    grid = generate_images(bundle, [p for p, _ in grid_rows], [s for _, s in grid_rows], sampling, config.batch_size)
    Image.fromarray(make_grid(grid, ncols=4)).save(out.with_suffix(".png"))
    out.with_suffix(".txt").write_text("".join(p + "\n" for p in prompts[: config.grid_prompts]), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def cpu_seconds() -> float:
    """CPU seconds of this process and of the child processes it waited for (the pre-training run)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Stopwatch:
    """Wall and CPU seconds of named stages."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn, *args):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn(*args)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"shapes-world: {name} done in {self.stages[name]['wall_s']}s", flush=True)
        return result


def build_world(
    config: WorldConfig, out: str | Path, skip_eval: bool = False, data_only: bool = False, skip_cot: bool = False
) -> dict:
    """Every stage in order (or only the data files); returns the build summary (also OUT/build.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    clock = Stopwatch()
    files = clock.run("data", write_data, config.data, out / "data")
    (out / "rewards.yaml").write_text(yaml.safe_dump(rewards_config(files["metadata"])), encoding="utf-8")
    if data_only:
        return {"stages": clock.stages}
    vae, losses = clock.run("vae", train_vae, config.vae, world_images(config.data))
    save_vae(vae, out / "vae")
    init_dir = clock.run("init", init_model, config, out / "vae", out / "init")
    last = clock.run("pretrain", pretrain, config, init_dir, files["pretrain"], out / "runs")
    shutil.copytree(last, out / "pretrained", dirs_exist_ok=True)
    if config.cot_config and not skip_cot:
        last = clock.run("cot", cot_sft, config, out / "pretrained", files["cot"], out / "runs")
        shutil.copytree(last, out / "pretrained_cot", dirs_exist_ok=True)
    summary = {"stages": clock.stages, "vae_recon_first_last": [losses[0], losses[-1]]}
    if not skip_eval:
        result = clock.run("eval", evaluate, config.eval, out / "pretrained", files["eval"], files["metadata"],
                           out / "samples_pretrained")  # fmt: skip
        summary["pretrained_heldout"] = {k: result[k] for k in ("strict", "partial", "num_images")}
    summary["total_wall_s"] = round(sum(s["wall_s"] for s in clock.stages.values()), 1)
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="world config (configs/shapes_world/world.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. vae.steps=50 data.num_pretrain=500")
    p.add_argument("--out", default="runs/shapes_world", help="output directory (default runs/shapes_world)")
    p.add_argument("--skip-eval", action="store_true", help="do not sample and score the pre-trained model")
    p.add_argument("--data-only", action="store_true", help="write the data files and rewards.yaml only (seconds)")
    p.add_argument("--skip-cot", action="store_true", help="do not run the Self-CoT SFT stage (OUT/pretrained_cot)")


def run(args: argparse.Namespace) -> int:
    config = load_config(WorldConfig, args.config, args.overrides)
    summary = build_world(config, args.out, skip_eval=args.skip_eval, data_only=args.data_only,
                          skip_cot=args.skip_cot)  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="rebuild the shapes world (data, VAE, pre-trained NextStep)")
    add_arguments(p)
    return run(p.parse_intermixed_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
