"""Sampler benchmark: prints ratios measured in one run on this machine (not a test).

For the `tiny` and `mid` presets (random weights, 64x64 images = 16 tokens, cfg 7.5, 50 head steps):
  * images/s and tokens/s of our batched KV-cache sampler at batch 1 and 16;
  * the same against an official-style loop (batch 1, a growing transformers DynamicCache, token and
    mask concatenation, global-RNG noise: the structure of the published pipeline) and against
    recompute-everything (no cache: every token reruns the whole sequence);
  * per-token time at 64 vs 1024 image tokens (128 vs 512 px) with the cache;
  * share of decode time spent in the backbone vs the flow head.
  * the attention before/after issue 16 in the same run: transformers' SDPA (repeat_kv over the whole
    preallocated cache) against our grouped SDPA, and the static-shape loop (what CUDA graphs replay,
    here eager) against the reference loop, and that loop with `sampling.compile` (inductor on CPU;
    its compile time, paid by the first call of each batch shape, is in the row's name).
With --device cuda: the table of bench/sampling_cuda.py instead (eager vs CUDA graphs, --preset full =
the published 14B architecture with random bf16 weights: per-token backbone/head ms at batch 1 against
the paper's 7.2 + 3.4 ms on an H100, images/s at 512^2 with 64 in flight against the 1.5 target).

    python bench/sampling.py [--quick] [--out bench/results/sampling_cpu.md]
    python bench/sampling.py --device cuda [--preset full] [--out bench/results/gpu_sampling.md]
    python bench/sampling.py --device cuda --variants [--preset full]  # graphs vs graphs + compile / flash
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from sampling_cuda import cuda_table, variant_table  # noqa: E402  (bench/ is first on sys.path when run as a script)

from base_model.checkpoint import build_random  # noqa: E402
from base_model.cuda_graphs import release_runners, sample_tokens_static  # noqa: E402
from base_model.flow import combine_guidance, head_step, time_grid  # noqa: E402
from base_model.model import KVCache  # noqa: E402
from base_model.sampler import SamplingConfig, sample_token, sample_tokens, token_norm  # noqa: E402
from base_model.sequence import append_image_block, build_prompt_batch  # noqa: E402

PROMPTS = [f"a photo of {n} {c} {s}" for n in ("one", "two") for c in ("red", "blue", "green", "gold")
           for s in ("circles", "squares")]  # fmt: skip


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def ours(bundle, prompts, sampling, batch_size, loop=sample_tokens):
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        pb = build_prompt_batch(bundle.tokenizer, bundle.ids, chunk, (sampling.image_size,) * 2, sampling.uses_guidance)
        loop(bundle.model, pb, torch.arange(s, s + len(chunk)), sampling)


def static_eager(model, pb, seeds, sampling):
    sample_tokens_static(model, pb, seeds, sampling, use_graphs=False)


def with_attention(bundle, name: str, fn, *args):
    """fn(*args) with the model's attention implementation set to `name` (transformers' "sdpa" = repeat_kv)."""
    old = bundle.model.config._attn_implementation
    bundle.model.config._attn_implementation = name
    try:
        return fn(*args)
    finally:
        bundle.model.config._attn_implementation = old


@torch.no_grad()
def official_style(bundle, prompts, sampling):
    """One prompt at a time, growing DynamicCache, concatenated tokens and masks, torch.randn noise."""
    from transformers import DynamicCache

    model, d = bundle.model, model_dim(bundle)
    grid = time_grid(sampling.num_head_steps, sampling.timestep_shift)
    for p in prompts:
        pb = build_prompt_batch(bundle.tokenizer, bundle.ids, [p], (sampling.image_size,) * 2, True)
        cache, mask = DynamicCache(), pb.attention_mask.clone()
        pos = torch.arange(mask.shape[1])
        c = model.backbone(model.embed(pb.input_ids), mask, pos, cache)[:, -1:]
        tokens = None
        for _ in range(pb.num_image_tokens):
            cond = model.image_condition(c[:, 0])
            x = torch.randn(1, d)
            for k in range(sampling.num_head_steps):
                t = grid[k].repeat(2)
                v = model.velocity(torch.cat([x, x]), t, cond)
                v = combine_guidance(v[:1], v[1:], sampling.cfg_scale)
                x = head_step(x, v, grid[k], grid[k + 1], "sde", noise=torch.randn(1, d)).x_next
            y = token_norm(x)
            tokens = y[:, None] if tokens is None else torch.cat([tokens, y[:, None]], dim=1)
            emb = model.image_in_projector(tokens[:, -1:]).repeat(2, 1, 1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            c = model.backbone(emb, mask, torch.tensor([mask.shape[1] - 1]), cache)


@torch.no_grad()
def recompute_everything(bundle, prompts, sampling, batch_size):
    """Batched like ours, but every token reruns the full teacher-forced pass (no KV cache)."""
    model = bundle.model
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        pb = build_prompt_batch(bundle.tokenizer, bundle.ids, chunk, (sampling.image_size,) * 2, True)
        ids, mask = append_image_block(pb, bundle.ids)
        grid = time_grid(sampling.num_head_steps).tolist()
        seeds = torch.arange(s, s + len(chunk))
        toks = torch.zeros(len(chunk), pb.num_image_tokens, model_dim(bundle))
        for j in range(pb.num_image_tokens):
            n = pb.prompt_len + j
            img = torch.cat([toks[:, :j], toks[:, :j]]) if j else None
            h = model.forward_sequence(ids[:, :n], mask[:, :n], img)
            x, _, _ = sample_token(model, model.image_condition(h[:, -1]), seeds, j, grid, sampling, False)
            toks[:, j] = token_norm(x)


def model_dim(bundle) -> int:
    return bundle.model.config.token_dim


@torch.no_grad()
def split_backbone_head(bundle, sampling, batch_size):
    """Seconds per image token in (backbone step, head K steps) at this batch size."""
    model = bundle.model
    pb = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS[:batch_size], (sampling.image_size,) * 2, True)
    rows, t = pb.input_ids.shape[0], pb.num_image_tokens
    max_len = pb.prompt_len + t
    valid = torch.ones(rows, max_len, dtype=torch.bool)
    valid[:, : pb.prompt_len] = pb.attention_mask
    cache = KVCache(model.config, rows, max_len, model.dtype, "cpu")
    h = model.backbone(model.embed(pb.input_ids), valid, torch.arange(pb.prompt_len), cache)
    cond = model.image_condition(h[:, -1])
    emb = torch.randn(rows, 1, model.config.hidden_size)
    grid = time_grid(sampling.num_head_steps).tolist()
    seeds = torch.arange(batch_size)

    def backbone_steps():
        for j in range(t):
            model.backbone(emb, valid, torch.tensor([pb.prompt_len + j]), cache)

    def head_steps():
        for j in range(t):
            sample_token(model, cond, seeds, j, grid, sampling, False)

    return timed(backbone_steps) / t, timed(head_steps) / t


@torch.no_grad()
def decode_step_time(bundle, batch_size, image_size):
    """Seconds of one backbone decode step at the last image token (the whole preallocated cache in use)."""
    model = bundle.model
    pb = build_prompt_batch(bundle.tokenizer, bundle.ids, PROMPTS[:batch_size], (image_size,) * 2, True)
    rows, max_len = pb.input_ids.shape[0], pb.prompt_len + pb.num_image_tokens
    cache = KVCache(model.config, rows, max_len, model.dtype, "cpu")
    valid = torch.ones(rows, max_len, dtype=torch.bool)
    emb = torch.randn(rows, 1, model.config.hidden_size)
    pos = torch.tensor([max_len - 1])
    return timed(lambda: model.backbone(emb, valid, pos, cache), repeats=5)


def per_token_time(bundle, image_size, steps):
    sampling = SamplingConfig(image_size=image_size, cfg_scale=7.5, num_head_steps=steps)
    tokens = (image_size // 16) ** 2
    return timed(lambda: ours(bundle, PROMPTS[:1], sampling, 1)) / tokens


def run(args) -> str:
    torch.set_num_threads(args.threads)
    sampling = SamplingConfig(image_size=64, cfg_scale=7.5, num_head_steps=args.steps)
    lines = [
        f"# Sampler benchmark (CPU, {args.threads} threads, 64x64 = 16 tokens, cfg 7.5, {args.steps} head steps)",
        "",
        "| preset | sampler | batch | images/s | tokens/s | vs official-style |",
        "|---|---|---|---|---|---|",
    ]
    extra = []
    for preset in ("tiny", "mid"):
        bundle = build_random(preset, seed=0)
        n = 16 if not args.quick else 4
        prompts = PROMPTS[:n]
        n_base = max(2, n // 4)  # the official-style loop is slow: time fewer prompts
        base_ips = n_base / timed(partial(official_style, bundle, prompts[:n_base], sampling))
        rows = [("official-style (batch 1, growing cache)", 1, base_ips)]
        for bs in (1, 16):
            secs = timed(partial(ours, bundle, prompts, sampling, bs))
            rows.append(("ours (KV cache)", bs, n / secs))
        secs = timed(partial(recompute_everything, bundle, prompts, sampling, 16))
        rows.append(("recompute everything (no cache)", 16, n / secs))
        secs = with_attention(bundle, "sdpa", timed, partial(ours, bundle, prompts, sampling, 16))
        rows.append(("ours, transformers' repeat_kv SDPA (before issue 16)", 16, n / secs))
        secs = timed(partial(ours, bundle, prompts, sampling, 16, static_eager))
        rows.append(("ours, static-shape loop run eagerly (CUDA graphs replay it)", 16, n / secs))
        compiled = dataclasses.replace(sampling, compile=True)
        t0 = time.perf_counter()
        ours(bundle, prompts, compiled, 16, static_eager)  # the first call compiles (inductor), then samples
        first_s = time.perf_counter() - t0
        secs = timed(partial(ours, bundle, prompts, compiled, 16, static_eager))
        rows.append((f"ours, static loop + torch.compile (inductor; first call {first_s:.0f} s with compile)",
                     16, n / secs))  # fmt: skip
        release_runners(bundle.model)
        for name, bs, ips in rows:
            lines.append(f"| {preset} | {name} | {bs} | {ips:.2f} | {ips * 16:.1f} | {ips / base_ips:.2f}x |")
        cache_ratio = rows[2][2] / rows[3][2]
        bb, hd = split_backbone_head(bundle, sampling, 16)
        grouped = decode_step_time(bundle, 16, 512)
        repeat_kv = with_attention(bundle, "sdpa", decode_step_time, bundle, 16, 512)
        extra.append(
            f"| {preset} | KV cache vs recompute-everything (batch 16) | {cache_ratio:.2f}x |\n"
            f"| {preset} | decode time share backbone / head (batch 16) | "
            f"{bb / (bb + hd):.0%} / {hd / (bb + hd):.0%} |\n"
            f"| {preset} | last decode step at 512px (1024 tokens), batch 16 + CFG: repeat_kv vs grouped SDPA | "
            f"{repeat_kv * 1e3:.2f} vs {grouped * 1e3:.2f} ms ({repeat_kv / grouped:.2f}x) |"
        )
        if preset == "tiny" or not args.quick:
            t64 = per_token_time(bundle, 128, 4)
            t1024 = per_token_time(bundle, 512, 4)
            extra.append(
                f"| {preset} | per-token ms at 64 vs 1024 tokens (batch 1, 4 head steps) | "
                f"{t64 * 1e3:.2f} vs {t1024 * 1e3:.2f} ms ({t1024 / t64:.2f}x) |"
            )
    lines += ["", "| preset | measure | value |", "|---|---|---|", *extra]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts (smoke run)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default bench/results/sampling_cpu.md, or gpu_sampling.md on cuda")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the eager vs CUDA graphs table")
    ap.add_argument("--preset", "--device-preset", dest="preset", default="full",
                    help="architecture of the cuda table: full (= nextstep-1-large, 14B), mid, tiny")  # fmt: skip
    ap.add_argument("--in-flight", type=int, default=64, help="images sampled together for the cuda throughput")
    ap.add_argument("--device-size", type=int, default=512, help="image side of the cuda table, pixels")
    ap.add_argument("--variants", action="store_true",
                    help="cuda: graphs vs graphs + compile / flash (sampling_cuda.py:variant_table)")  # fmt: skip
    args = ap.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.exit(2, "sampling.py: error: --device cuda: no CUDA device here (torch sees none)\n")
        table_fn = variant_table if args.variants else cuda_table
        table = "\n".join(table_fn(args.preset, args.in_flight, args.device_size, args.steps))
    else:
        table = run(args)
    name = ("gpu_variants" if args.variants else "gpu_sampling") if args.device == "cuda" else "sampling_cpu"
    args.out = args.out or f"bench/results/{name}.md"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
