"""Does the Self-CoT shapes model plan, and does planning help? Held-out prompts x seeds, the rule reward.

    python bench/shapes_cot.py [--cot shapes/assets/pretrained_cot] [--pretrained shapes/assets/pretrained]
                               [--data runs/shapes/world/data] [--seeds 4] [--out bench/results/shapes_cot.md]

(--data: `nsalign shapes-world configs/shapes_world/world.yaml --out runs/shapes/world --data-only`.)
Every arm samples the same eval prompts with the same seeds (cfg 3.0, 25 head steps): the pre-trained asset
plainly, the Self-CoT asset plainly, and the Self-CoT asset writing its plan first (template of
configs/shapes/cot.yaml) at temperature 1.0 and greedily. Per arm: GenEval strict / partial (rewards.geneval,
shapes detector); for Self-CoT arms the share of plans that parse (`scenes.parse_plan`), that agree with the
caption (`scenes.plan_agrees`: count, colours, shapes, distinct cells, the relation between the cells), and
of images that draw exactly the plan (detected colour, shape and cell of every object); strict gains over
plain sampling of the same model with per-prompt paired bootstrap 95% intervals.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from base_model.checkpoint import load_checkpoint  # noqa: E402
from base_model.generate import decode_text, decode_tokens, sample_prompts  # noqa: E402
from base_model.sampler import SamplingConfig  # noqa: E402
from base_model.text import CotConfig  # noqa: E402
from core.schema import from_dict, load_config  # noqa: E402
from dashboard.markdown import markdown_table  # noqa: E402
from dashboard.stats import mean_ci, per_prompt_delta_ci  # noqa: E402
from jobs.sft import SftConfig  # noqa: E402
from rewards.base import RewardsConfig, build_reward  # noqa: E402
from rewards.shapes_detect import ShapesDetector  # noqa: E402
from rollout.prompts import load_prompts  # noqa: E402
from shapes.scenes import COLORS, KINDS, SHAPES, all_specs, caption, cell, parse_plan, plan_agrees  # noqa: E402
from shapes.world import rewards_config  # noqa: E402


def image_follows_plan(image: torch.Tensor, plan: str, detector: ShapesDetector) -> bool:
    """uint8 [3, 64, 64]: the detected objects (colour, shape, cell of the box centre) are the plan's, as a multiset."""
    objects = parse_plan(plan)
    if objects is None:
        return False
    found = [(d.color, d.label, cell((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2)) for d in detector(image)]
    return collections.Counter(found) == collections.Counter(objects)


def sample_arm(bundle, prompts: list[str], seeds: list[int], sampling: SamplingConfig, batch: int):
    """-> (images uint8 [N, 3, 64, 64], plans [N] or None, seconds)."""
    start, images, texts = time.perf_counter(), [], []
    for i in range(0, len(prompts), batch):
        res = sample_prompts(bundle, prompts[i : i + batch], seeds[i : i + batch], sampling)
        images.append(decode_tokens(bundle, res.tokens, sampling.image_size))
        texts += decode_text(bundle, res.text) or []
    return torch.cat(images), (texts if sampling.self_cot else None), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cot", default="shapes/assets/pretrained_cot")
    p.add_argument("--pretrained", default="shapes/assets/pretrained")
    p.add_argument("--data", default="runs/shapes/world/data")
    p.add_argument("--config", default="configs/shapes/cot.yaml", help="the SFT config: its cot.template")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--prompts", type=int, default=None, help="the first N eval prompts (default: all)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--run", default="runs/shapes/world/runs/cot", help="the SFT run: its metrics, if there")
    p.add_argument("--out", default="bench/results/shapes_cot.md")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Path(args.data)
    trained = load_config(SftConfig, args.config, ["data.path=" + str(data / "cot.parquet")])
    cot = CotConfig(template=trained.cot.template, max_text_tokens=trained.cot.max_text_tokens)
    base = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=25)
    cot_sampling = dataclasses.replace(base, self_cot=True, cot=cot)
    greedy = dataclasses.replace(cot_sampling, cot=dataclasses.replace(cot, temperature=0.0))
    arms = [
        ("pretrained, plain", args.pretrained, base),
        ("cot, plain", args.cot, base),
        ("cot, self-cot T=1.0", args.cot, cot_sampling),
        ("cot, self-cot greedy", args.cot, greedy),
    ]
    prompts = [q.text for q in load_prompts(data / "eval.jsonl")][: args.prompts]
    rows = [(q, s) for q in prompts for s in range(args.seeds)]
    captions, seeds = [q for q, _ in rows], [s for _, s in rows]
    specs = {caption(s): s for s in all_specs(list(COLORS), list(SHAPES))}
    reward = build_reward(from_dict(RewardsConfig, rewards_config(data / "metadata.jsonl")).rewards[0])
    detector = ShapesDetector()
    results, bundles = {}, {}
    for name, model, sampling in arms:
        bundle = bundles.setdefault(model, load_checkpoint(model))
        images, plans, seconds = sample_arm(bundle, captions, seeds, sampling, args.batch)
        scores = reward(images, captions)
        res = {"strict": scores.components["strict"].numpy(), "partial": scores.components["partial"].numpy(),
               "seconds": seconds, "plans": plans}  # fmt: skip
        if plans is not None:
            res["parses"] = np.array([parse_plan(t) is not None for t in plans], dtype=np.float64)
            res["agrees"] = np.array([plan_agrees(t, specs[c]) for t, c in zip(plans, captions)], dtype=np.float64)
            res["follows"] = np.array([image_follows_plan(im, t, detector) for im, t in zip(images, plans)],
                                      dtype=np.float64)  # fmt: skip
        results[name] = res
        print(f"{name}: strict {res['strict'].mean():.3f} partial {res['partial'].mean():.3f} ({seconds:.0f}s)")
    lines = write_report(results, captions, specs, args)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def training_lines(metrics: Path) -> list[str]:
    """Steps, wall time and the first / last 50 steps' mean losses of the SFT run (nothing if not there)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    keys = ("sft/text_ce", "sft/flow_matching", "sft/reasoning_nll")

    def means(part: list[dict]) -> str:
        return ", ".join(f"{k.split('/')[1]} {np.nanmean([r.get(k, np.nan) for r in part]):.4f}" for k in keys)

    return [f"Training ({metrics.parent}): {len(rows)} steps in {rows[-1]['time'] - rows[0]['time']:.0f} s wall "
            f"(shared 2-core machine); steps 1-50: {means(rows[:50])}; last 50: {means(rows[-50:])} "
            "(reasoning_nll: nats per plan token and stop event).", ""]  # fmt: skip


def pct(x: np.ndarray) -> str:
    m, lo, hi = mean_ci(x)
    return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_report(results: dict, captions: list[str], specs: dict, args) -> list[str]:
    n = len(captions)
    head = ["arm", "strict %", "partial %", "plan parses %", "plan agrees %", "image = plan %", "sampling s"]
    table = []
    for name, r in results.items():
        cot = [pct(r[k]) for k in ("parses", "agrees", "follows")] if r["plans"] is not None else ["-"] * 3
        table.append([name, pct(r["strict"]), pct(r["partial"]), *cot, f"{r['seconds']:.0f}"])
    plain = results["cot, plain"]["strict"]
    deltas = [["arm", "strict gain over `cot, plain` (points, per-prompt paired 95% CI)"]]
    for name, r in results.items():
        if name != "cot, plain":
            m, lo, hi = per_prompt_delta_ci(r["strict"], plain, captions)
            deltas.append([name, f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"])
    kind_of = np.array([specs[c].kind for c in captions])
    kinds = [["arm", *(f"{k} strict % ({(kind_of == k).sum() // args.seeds} prompts)" for k in KINDS)]]
    for name, r in results.items():
        kinds.append([name, *(f"{100 * r['strict'][kind_of == k].mean():.1f}" for k in KINDS)])
    example = results["cot, self-cot T=1.0"]["plans"]
    lines = [
        "# Self-CoT in the shapes world: plans before images",
        "",
        f"`python bench/shapes_cot.py --seeds {args.seeds}` ({n} images per arm: {n // args.seeds} held-out eval "
        f"prompts x {args.seeds} seeds, the same seeds in every arm; cfg 3.0, 25 head steps; CPU).",
        f"Models: `{args.pretrained}` and `{args.cot}` (`nsalign sft {args.config}`). Self-CoT arms use its template "
        f"`{load_config(SftConfig, args.config, ['data.path=x']).cot.template!r}`, max 96 text tokens.",
        "Intervals: bootstrap 95% of the mean over images; gains: per-prompt paired bootstrap. `image = plan`: "
        "the detector finds exactly the plan's objects (colour, shape, 3x3 cell of the box centre).",
        "",
        *training_lines(Path(args.run) / "metrics.jsonl"),
        markdown_table(head, table),
        "",
        markdown_table(deltas[0], deltas[1:]),
        "",
        markdown_table(kinds[0], kinds[1:]),
        "",
        "First plans written at temperature 1.0 (caption -> plan):",
        "",
        *[f"- {c} -> `{t}`" for c, t in list(zip(captions, example))[:: args.seeds][:12]],
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
