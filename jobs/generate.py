"""`nsalign generate`: sample images from a checkpoint (or a random `tiny` model) into a PNG grid.

With --self-cot each image is preceded by the model's own reasoning (base_model/text.py): the CoT
template wraps the caption, the model writes at most --max-text-tokens of text, then the image. Each
reasoning is printed and written beside the grid, one JSON line per image in grid order (<out>.jsonl).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from base_model.checkpoint import resolve_model
from base_model.config import RANDOM_PRESETS
from base_model.generate import decode_text, generate_with_text, make_grid
from base_model.sampler import SamplingConfig
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, check_sequence_fits, model_max_positions, truncation_note
from base_model.text import CotConfig, TextSample
from core.errors import UserError
from core.files import atomic_write_text

COT_FLAGS = {  # CotConfig field -> the flag that sets it (only with --self-cot)
    "template": "cot_template", "max_text_tokens": "max_text_tokens", "temperature": "text_temperature",
    "top_p": "text_top_p",
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (published layout), or tiny/mid")
    p.add_argument("--prompt", action="append", required=True, help="caption; repeat for several")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cfg-scale", "--cfg", type=float, default=7.5, help="classifier-free guidance scale on the head velocity"
    )
    p.add_argument("--steps", type=int, default=50, help="flow-head steps per token")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 64 tiny, 512 else)")
    p.add_argument("--sde", choices=["sde", "ode", "cps"], default="sde")
    p.add_argument("--time-grid", choices=["uniform", "final_euler"], default="uniform",
                   help="uniform: the hub sampler's and our jobs' (every step stochastic, ends at t=1); "
                        "final_euler: the NextStep-1 GitHub release's (last step a 0.04 Euler step)")  # fmt: skip
    p.add_argument("--noise", choices=["counter", "published"], default="counter",
                   help="published: the published pipeline's torch-generator draws after set_seed(--seed), "
                        "so a published checkpoint gives the published image; counter: per-image noise")  # fmt: skip
    p.add_argument("--no-norm", action="store_true", help="disable use_norm on sampled tokens")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="longer prompts keep their first N tokens (reported once)")  # fmt: skip
    cot = CotConfig()
    p.add_argument("--self-cot", action="store_true",
                   help="the model writes its reasoning before each image (printed, saved to <out>.jsonl)")  # fmt: skip
    p.add_argument("--cot-template", help="with --self-cot: the prompt around the caption, with {caption} once "
                                          "(default: reason about objects, counts, colours and positions)")  # fmt: skip
    p.add_argument("--max-text-tokens", type=int,
                   help=f"with --self-cot: reasoning tokens at most (default {cot.max_text_tokens})")  # fmt: skip
    p.add_argument("--text-temperature", type=float,
                   help=f"with --self-cot: reasoning temperature, 0 greedy (default {cot.temperature})")  # fmt: skip
    p.add_argument("--text-top-p", type=float,
                   help=f"with --self-cot: reasoning nucleus sampling (default {cot.top_p})")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output PNG (a grid: one row per prompt)")


def run(args: argparse.Namespace) -> int:
    size = args.size or (64 if args.checkpoint in RANDOM_PRESETS else 512)
    sampling = SamplingConfig(
        image_size=size, cfg_scale=args.cfg_scale, num_head_steps=args.steps, timestep_shift=args.shift,
        sde_kind=args.sde, use_norm=not args.no_norm, negative_prompt=args.negative_prompt,
        max_prompt_tokens=args.max_prompt_tokens, time_grid=args.time_grid, noise=args.noise,
        self_cot=args.self_cot, cot=cot_config(args),
    )  # fmt: skip
    sampling.validate("generate")
    check_sequence_fits(args.max_prompt_tokens, (size, size), model_max_positions(args.checkpoint),
                        "--max-prompt-tokens", text_tokens=sampling.text_tokens)  # fmt: skip
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be >= 1")
    if args.noise == "published" and args.batch_size % args.num_images:  # a batch = whole captions = one call
        raise UserError(f"--noise published: --batch-size must be a multiple of --num-images ({args.num_images})")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {out}")
    if any(not p.strip() for p in args.prompt):
        raise UserError("--prompt must not be empty")
    check_writable(out.parent)  # before minutes of sampling, not after
    dtype = getattr(torch, args.dtype)
    bundle = resolve_model(args.checkpoint, dtype=dtype, device=args.device)
    note = truncation_note("generate", "--max-prompt-tokens", bundle.tokenizer, args.prompt, sampling.max_prompt_tokens)
    if note:
        print(note)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num_images)]
    t0 = time.perf_counter()
    images, text = generate_with_text(bundle, prompts, seeds, sampling, batch_size=args.batch_size, progress=True)
    elapsed = time.perf_counter() - t0
    grid = make_grid(images, ncols=args.num_images)
    write_png(grid, out)
    print(f"wrote {out} ({len(prompts)} images of {size}x{size} in {elapsed:.2f}s, "
          f"{len(prompts) / elapsed:.2f} images/s)")  # fmt: skip
    if text is not None:
        records = reasoning_records(prompts, seeds, args.num_images, text, decode_text(bundle, text))
        print_reasoning(records, sampling.cot.max_text_tokens)
        atomic_write_text(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {out.with_suffix('.jsonl')} (each image's reasoning, one JSON line per image in grid order)")
    return 0


def cot_config(args: argparse.Namespace) -> CotConfig:
    """The CoT flags given -> CotConfig (defaults for the rest); a CoT flag without --self-cot is refused."""
    given = {field: getattr(args, name) for field, name in COT_FLAGS.items() if getattr(args, name) is not None}
    if given and not args.self_cot:
        raise UserError(f"--{COT_FLAGS[next(iter(given))].replace('_', '-')} needs --self-cot")
    return CotConfig(**given)


def reasoning_records(
    prompts: list[str], seeds: list[int], num_images: int, text: TextSample, decoded: list[str]
) -> list[dict]:
    """One record per image, in grid order (row = prompt, column = image of that prompt)."""
    return [{"row": i // num_images, "column": i % num_images, "prompt": prompts[i], "seed": seeds[i],
             "text": decoded[i], "text_ids": ids, "stopped": bool(text.stopped[i])}
            for i, ids in enumerate(text.rows())]  # fmt: skip


def print_reasoning(records: list[dict], max_text_tokens: int) -> None:
    """Each reasoning under a header, indented; control characters escaped (they would drive the terminal)."""
    for r in records:
        end = "stopped" if r["stopped"] else f"cut at {max_text_tokens} tokens"
        print(f"reasoning, row {r['row'] + 1} image {r['column'] + 1} (seed {r['seed']}, {end}): {r['prompt']}")
        shown = "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in r["text"])
        print("  " + shown.replace("\n", "\n  "))


def check_writable(directory: Path) -> None:
    """UserError unless `directory`, or its nearest existing ancestor when it is still to be made, takes
    a new file (a probe, removed at once). Creates nothing that stays."""
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".nsalign-probe-"):
            pass
    except OSError as e:
        raise UserError(f"--out: cannot write to {existing} ({e.strerror or e})") from None


def write_png(grid, out: Path) -> None:
    """HxWx3 uint8 -> `out` atomically; a failed write (disk full, ...) leaves no temporary file."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(tmp, format="PNG")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
