"""The CUDA table of bench/sampling.py: eager against CUDA graphs on one GPU, random weights in bf16.

`--preset full` is the published NextStep-1-Large architecture (base_model.config PRESETS
"nextstep-1-large": hidden 5120, 48 layers, 40/8 heads, head 1536 x 12 blocks, ~14.9B parameters),
built on the meta device and materialised in bf16 on the GPU (never fp32, nothing downloaded).
Rows: per-token backbone and head ms at batch 1 + CFG (paper, H100: 7.2 + 3.4 ms), the decode step and
head loop with `in_flight` images (transformers' repeat_kv SDPA against our grouped SDPA), and images/s
at the given size with `in_flight` images: the reference loop (eager) against the graphed static loop.
`variant_table` (--variants): the graphed static loop against itself with `sampling.compile` (inductor
kernels captured in our graphs) and with `sampling.attention: flash` (flash-attn's kvcache kernel).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import torch

from base_model.config import preset_config
from base_model.cuda_graphs import release_runners, runner_for, runner_key, sample_tokens_static
from base_model.flash_attention import sampling_attention
from base_model.model import GROUPED_SDPA, NextStepModel
from base_model.sampler import SamplingConfig, sample_tokens
from base_model.sequence import build_prompt_batch
from base_model.tokenizer import build_tiny_tokenizer, special_ids

PRESET_ALIASES = {"full": "nextstep-1-large"}


def random_model_on(preset: str, device: str, dtype: torch.dtype) -> NextStepModel:
    """A preset's architecture with random weights built directly on `device` in `dtype`."""
    preset = PRESET_ALIASES.get(preset, preset)
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


def synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clock(fn, repeats: int = 1, warmup: bool = True) -> float:
    """Seconds per call of fn on the GPU (synchronized before and after)."""
    if warmup:
        fn()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - t0) / repeats


def row(measure: str, eager_s: float, graphs_s: float, reference: str, unit: str = "ms") -> str:
    """One table row; printed at once too, so a run cut short by a time limit still shows its rows."""
    if unit == "ms":
        e, g = f"{eager_s * 1e3:.2f} ms", f"{graphs_s * 1e3:.2f} ms"
    else:  # a rate: the values are already per second
        e, g = f"{eager_s:.3f} {unit}", f"{graphs_s:.3f} {unit}"
    ratio = eager_s / graphs_s if unit == "ms" else graphs_s / eager_s
    line = f"| {measure} | {e} | {g} | {ratio:.2f}x | {reference} |"
    print(line, flush=True)
    return line


@torch.no_grad()
def cuda_table(preset: str, in_flight: int, image_size: int, steps: int, device: str = "cuda") -> list[str]:
    """The markdown rows of the CUDA table (see the module docstring); device "cpu" is a smoke run
    of this code (no graphs: both columns eager)."""
    graphs = device == "cuda"
    t_build = time.perf_counter()
    model = random_model_on(preset, device, torch.bfloat16 if graphs else torch.float32)
    build_s = time.perf_counter() - t_build
    params = sum(p.numel() for p in model.parameters())
    tok = build_tiny_tokenizer()  # prompt text only: its ids are valid rows of any larger vocabulary
    ids = special_ids(tok)
    sampling = SamplingConfig(image_size=image_size, cfg_scale=7.5, num_head_steps=steps)
    size = (image_size, image_size)
    lines = [
        f"# Sampler on {torch.cuda.get_device_name() if graphs else device} ({preset}: {params / 1e9:.2f}B parameters, "
        f"{model.dtype} weights, fp32 head maths; random weights built in {build_s:.0f} s; torch {torch.__version__})",
        "",
        f"{image_size}x{image_size} = {(image_size // 16) ** 2} image tokens, cfg 7.5, {steps} head steps. "
        "Eager and graphs run the same static-shape functions (base_model/cuda_graphs.py), except the last "
        "row's eager column: the reference loop (base_model/sampler.py).",
        "",
        "| measure | eager | CUDA graphs | speed-up | reference |",
        "|---|---|---|---|---|",
    ]

    one = build_prompt_batch(tok, ids, ["a photo of a cat"], size, True)
    run = runner_for(model, runner_key(model, one, sampling, False, graphs))
    run.prompt_len.fill_(one.prompt_len)
    run.token.fill_(one.num_image_tokens // 2)  # a mid-image position: half the cache in use
    lines.append(row("backbone per token, batch 1 + CFG", clock(run.decode.fn, 10), clock(run.decode, 50),
                     "paper H100: 7.2 ms"))  # fmt: skip
    lines.append(row(f"flow head per token ({steps} steps), batch 1 + CFG", clock(run.head.fn, 3), clock(run.head, 20),
                     "paper H100: 3.4 ms"))  # fmt: skip
    release_runners(model)

    prompts = [f"a photo of object number {i}" for i in range(in_flight)]
    many = build_prompt_batch(tok, ids, prompts, size, True)
    synchronize()
    t_capture = time.perf_counter()
    run = runner_for(model, runner_key(model, many, sampling, False, graphs))  # the one sample_tokens_static reuses
    synchronize()
    capture_s = time.perf_counter() - t_capture
    run.prompt_len.fill_(many.prompt_len)
    run.token.fill_(many.num_image_tokens - 2)  # the last decode step: the whole cache in use
    grouped_eager, grouped_graphs = clock(run.decode.fn, 5), clock(run.decode, 10)
    model.config._attn_implementation = "sdpa"  # transformers' path: repeat_kv over the cache, then SDPA
    repeat_kv_eager = clock(run.decode.fn, 3)
    model.config._attn_implementation = GROUPED_SDPA
    lines.append(row(f"backbone, last decode step, {in_flight} in flight + CFG: grouped SDPA", grouped_eager,
                     grouped_graphs, f"transformers repeat_kv SDPA, eager: {repeat_kv_eager * 1e3:.2f} ms "
                     f"({repeat_kv_eager / grouped_eager:.2f}x ours eager)"))  # fmt: skip
    lines.append(row(f"flow head per token, {in_flight} in flight + CFG", clock(run.head.fn, 1), clock(run.head, 5),
                     f"capture of both graphs: {capture_s:.1f} s per batch shape"))  # fmt: skip

    seeds = torch.arange(in_flight)
    graphs_s = clock(lambda: sample_tokens_static(model, many, seeds, sampling, use_graphs=graphs), warmup=False)
    release_runners(model)
    if graphs:
        torch.cuda.reset_peak_memory_stats()
    small = SamplingConfig(image_size=32, cfg_scale=7.5, num_head_steps=steps)
    sample_tokens(model, build_prompt_batch(tok, ids, prompts, (32, 32), True), seeds, small)  # warm-up
    eager_s = clock(lambda: sample_tokens(model, many, seeds, sampling), warmup=False)
    lines.append(row(f"images/s at {image_size}px, {in_flight} in flight (reference loop vs graphs)",
                     in_flight / eager_s, in_flight / graphs_s, "target >= 1.5 per H100", unit="img/s"))  # fmt: skip
    if graphs:
        lines += ["", f"Peak GPU memory of the eager run: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB."]
    return lines


@torch.no_grad()
def variant_table(preset: str, in_flight: int, image_size: int, steps: int, device: str = "cuda") -> list[str]:
    """Rows: decode step, head loop and images/s of the graphed static loop, plain against compiled
    (compile time shown: the first call of each runner pays it) and against flash attention.
    device "cpu" is a smoke run of this code (no graphs, fp32: flash refused, in its row)."""
    graphs = device == "cuda"
    model = random_model_on(preset, device, torch.bfloat16 if graphs else torch.float32)
    tok = build_tiny_tokenizer()
    ids = special_ids(tok)
    base = SamplingConfig(image_size=image_size, cfg_scale=7.5, num_head_steps=steps)
    many = build_prompt_batch(tok, ids, [f"a photo of object number {i}" for i in range(in_flight)],
                              (image_size, image_size), True)  # fmt: skip
    seeds = torch.arange(in_flight)
    lines = [
        f"# Graphed static loop variants ({preset}, {model.dtype}, {image_size}px, {in_flight} in flight + CFG, "
        f"{steps} head steps; {torch.cuda.get_device_name() if graphs else device})",
        "",
        "| measure | graphs | graphs + variant | speed-up | note |",
        "|---|---|---|---|---|",
    ]

    def measure(config: SamplingConfig) -> tuple[float, float, float, float]:
        """(runner build s: compile + capture, decode step s, head loop s, images/s)"""
        synchronize()
        t0 = time.perf_counter()
        with sampling_attention(model, config.attention):  # captured (and compiled) with this attention
            run = runner_for(model, runner_key(model, many, config, False, graphs))
            run.prompt_len.fill_(many.prompt_len)
            run.token.fill_(many.num_image_tokens - 2)
            synchronize()
            build = time.perf_counter() - t0
            decode, head = clock(run.decode, 10), clock(run.head, 5)
        whole = clock(lambda: sample_tokens_static(model, many, seeds, config, use_graphs=graphs), warmup=False)
        release_runners(model)
        return build, decode, head, in_flight / whole

    plain = measure(base)
    variants = [("compile", dataclasses.replace(base, compile=True))]
    if importlib.util.find_spec("flash_attn") is not None or not graphs:
        variants.append(("flash", dataclasses.replace(base, attention="flash")))
        variants.append(("compile + flash", dataclasses.replace(base, compile=True, attention="flash")))
    else:
        lines.append("| flash | - | - | - | flash_attn not importable here |")
    for name, config in variants:
        try:
            other = measure(config)
        except Exception as e:  # a row, not a lost table: the GPU session reads every variant's outcome
            lines.append(f"| {name} | - | - | - | failed: {type(e).__name__}: {str(e)[:200]} |")
            print(lines[-1], flush=True)
            continue
        note = f"runner build (compile + capture) {other[0]:.1f} s vs {plain[0]:.1f} s"
        lines.append(row(f"{name}: backbone, last decode step", plain[1], other[1], note))
        lines.append(row(f"{name}: flow head per token", plain[2], other[2], ""))
        lines.append(row(f"{name}: images/s", plain[3], other[3], "", unit="img/s"))
    return lines
