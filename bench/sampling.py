"""Sampler benchmark: prints ratios measured in one run on this machine (not a test).

For the `tiny` and `mid` presets (random weights, 64x64 images = 16 tokens, cfg 7.5, 50 head steps):
  * images/s and tokens/s of our batched KV-cache sampler at batch 1 and 16;
  * the same against an official-style loop (batch 1, a growing transformers DynamicCache, token and
    mask concatenation, global-RNG noise: the structure of the published pipeline) and against
    recompute-everything (no cache: every token reruns the whole sequence);
  * per-token time at 64 vs 1024 image tokens (128 vs 512 px) with the cache;
  * share of decode time spent in the backbone vs the flow head.
With --device-preset nextstep-1-large (on a CUDA machine): bf16 per-token latency of the full-size
architecture (random weights) against the paper's 7.2 ms backbone + 3.4 ms head on an H100, and
images/s at 512^2 with 64 images in flight.

    python bench/sampling.py [--quick] [--out bench/results/sampling_cpu.md]
    python bench/sampling.py --quick --device-preset nextstep-1-large --device cuda --out bench/results/sampling_h100.md
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch

import base_model  # noqa: F401
from base_model.checkpoint import build_random
from base_model.flow import combine_guidance, head_step, time_grid
from base_model.model import KVCache
from base_model.sampler import SamplingConfig, sample_token, sample_tokens, token_norm
from base_model.sequence import append_image_block, build_prompt_batch

PROMPTS = [f"a photo of {n} {c} {s}" for n in ("one", "two") for c in ("red", "blue", "green", "gold")
           for s in ("circles", "squares")]  # fmt: skip


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def ours(bundle, prompts, sampling, batch_size):
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        pb = build_prompt_batch(bundle.tokenizer, bundle.ids, chunk, (sampling.image_size,) * 2, sampling.uses_guidance)
        sample_tokens(bundle.model, pb, torch.arange(s, s + len(chunk)), sampling)


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


def per_token_time(bundle, image_size, steps):
    sampling = SamplingConfig(image_size=image_size, cfg_scale=7.5, num_head_steps=steps)
    tokens = (image_size // 16) ** 2
    return timed(lambda: ours(bundle, PROMPTS[:1], sampling, 1)) / tokens


def random_model_on(preset: str, device: str, dtype: torch.dtype):
    """Full-size (or any preset) architecture with random weights built directly on `device`."""
    from base_model.config import preset_config
    from base_model.model import NextStepModel
    from base_model.tokenizer import build_tiny_tokenizer, special_ids

    ids = special_ids(build_tiny_tokenizer())
    config = preset_config(preset)
    if config.image_placeholder_id is None:  # small presets: take the special ids of the byte tokenizer
        config = preset_config(preset, boi=ids.boi, eoi=ids.eoi, image_placeholder_id=ids.placeholder)
    with torch.device("meta"):
        model = NextStepModel(config).to(dtype)  # cast on meta: the 14B model never exists in fp32
    model.to_empty(device=device)
    model.init_weights(std=0.02)
    for m in model.modules():  # norms: unit scale
        if hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 1:
            torch.nn.init.ones_(m.weight)
    return model.place(device=device, dtype=dtype).eval()


@torch.no_grad()
def device_section(preset: str, device: str, in_flight: int, image_size: int, steps: int) -> list[str]:
    """Per-token latency (batch 1, CFG) of backbone and head, and images/s with `in_flight` samples."""
    from base_model.tokenizer import build_tiny_tokenizer, special_ids

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_model_on(preset, device, dtype)
    tok = build_tiny_tokenizer()  # prompt text only: its ids are valid rows of any larger vocabulary
    ids = special_ids(tok)
    config = model.config
    sampling = SamplingConfig(image_size=image_size, cfg_scale=7.5, num_head_steps=steps)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def clock(fn, n=1):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    pb = build_prompt_batch(tok, ids, ["a photo of a cat"], (image_size, image_size), True).to(device)
    rows, t = pb.input_ids.shape[0], pb.num_image_tokens
    cache = KVCache(config, rows, pb.prompt_len + t, dtype, device)
    valid = torch.ones(rows, pb.prompt_len + t, dtype=torch.bool, device=device)
    positions = torch.arange(pb.prompt_len + t, device=device)
    model.backbone(model.embed(pb.input_ids), valid, positions[: pb.prompt_len], cache)
    emb = torch.randn(rows, 1, config.hidden_size, device=device, dtype=dtype)
    pos = positions[pb.prompt_len + 10 : pb.prompt_len + 11]
    backbone_ms = clock(lambda: model.backbone(emb, valid, pos, cache), 20) * 1e3
    cond = torch.randn(rows, config.hidden_size, device=device, dtype=dtype)
    grid = time_grid(steps).tolist()
    seeds = torch.arange(1, device=device)
    head_ms = clock(lambda: sample_token(model, cond, seeds, 0, grid, sampling, False), 5) * 1e3
    prompts = [f"a photo of object number {i}" for i in range(in_flight)]
    pbs = build_prompt_batch(tok, ids, prompts, (image_size, image_size), True)
    secs = clock(lambda: sample_tokens(model, pbs, torch.arange(in_flight), sampling), 1)
    return [
        f"| {preset} on {device} ({str(dtype).replace('torch.', '')}) | backbone ms/token, batch 1 + CFG | "
        f"{backbone_ms:.2f} (paper H100: 7.2) |",
        f"| {preset} on {device} | flow head ms/token, {steps} steps + CFG | {head_ms:.2f} (paper H100: 3.4) |",
        f"| {preset} on {device} | images/s at {image_size}px, {in_flight} in flight | {in_flight / secs:.3f} "
        f"(target >= 1.5; paper batch-1 pipeline 0.09) |",
    ]


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
        for name, bs, ips in rows:
            lines.append(f"| {preset} | {name} | {bs} | {ips:.2f} | {ips * 16:.1f} | {ips / base_ips:.2f}x |")
        cache_ratio = rows[2][2] / rows[3][2]
        bb, hd = split_backbone_head(bundle, sampling, 16)
        extra.append(
            f"| {preset} | KV cache vs recompute-everything (batch 16) | {cache_ratio:.2f}x |\n"
            f"| {preset} | decode time share backbone / head (batch 16) | "
            f"{bb / (bb + hd):.0%} / {hd / (bb + hd):.0%} |"
        )
        if preset == "tiny" or not args.quick:
            t64 = per_token_time(bundle, 128, 4)
            t1024 = per_token_time(bundle, 512, 4)
            extra.append(
                f"| {preset} | per-token ms at 64 vs 1024 tokens (batch 1, 4 head steps) | "
                f"{t64 * 1e3:.2f} vs {t1024 * 1e3:.2f} ms ({t1024 / t64:.2f}x) |"
            )
    if args.device_preset:
        extra += device_section(args.device_preset, args.device, args.in_flight, args.device_size, args.steps)
    lines += ["", "| preset | measure | value |", "|---|---|---|", *extra]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts (smoke run)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/sampling_cpu.md")
    ap.add_argument("--device-preset", default=None, help="also time this preset on --device (nextstep-1-large on GPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--in-flight", type=int, default=64, help="images sampled together for the device throughput")
    ap.add_argument("--device-size", type=int, default=512)
    args = ap.parse_args()
    table = run(args)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
