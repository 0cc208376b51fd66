"""The flow head's sampler maths as pure functions: time grids (ours and NextStep-1's), CFG (two and
three branches), one head step that both samples and scores (sde / ode / cps), counter-based noise and
the published pipelines' torch-generator noise, and the flow-matching training targets.

Time runs from noise (t=0) to data (t=1): x_t = t * x1 + (1 - t) * e, velocity v = x1 - e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from core.errors import UserError

SdeKind = Literal["sde", "ode", "cps"]
LogProbReduction = Literal["sum", "mean"]
# uniform: K steps on linspace(0,1,K+1), all of the sampler's kind (NextStep-1.1's hub sampler, the
# authoritative one, docs/algorithms.md §3; every result committed here used it). final_euler: the
# NextStep-1 GitHub release's `FlowMatchingHead.sample` (an older release), K-1 steps on
# linspace(0, 1-0.04, K), then one deterministic Euler step of 0.04 from the last grid time.
TimeGridKind = Literal["uniform", "final_euler"]
PUBLISHED_LAST_STEP = 0.04  # NextStep-1's `last_step_size`, in unshifted time (the shift is not applied)


def time_grid(
    num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu", kind: TimeGridKind = "uniform"
) -> torch.Tensor:
    """[K+1] times t_0 = 0 .. t_K of the K head steps; shift s maps t -> t / (s - (s-1) t).

    uniform: linspace(0,1,K+1)[:-1], shifted, then 1.0 appended (t_K = 1 whatever the shift).
    final_euler: linspace(0, 0.96, K) in fp32, shifted, then t_{K-1} + 0.04 appended, so with s != 1 the
    chain stops short of (s < 1: past) t = 1, as NextStep-1's pipeline does.
    """
    if kind == "uniform":
        ts = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)[:-1]
        ts = ts / (shift - (shift - 1.0) * ts)
        return torch.cat([ts, ts.new_ones(1)]).to(device=device, dtype=torch.float32)
    if kind != "final_euler":
        raise ValueError(f"unknown time grid {kind!r}")
    # fp32 on the CPU, as published: the head then sees bit-identical times
    ts = torch.linspace(0.0, 1.0 - PUBLISHED_LAST_STEP, num_steps, dtype=torch.float32)
    ts = ts / (shift - (shift - 1.0) * ts)
    return torch.cat([ts, ts[-1:] + PUBLISHED_LAST_STEP]).to(device=device)


def num_sde_steps(kind: TimeGridKind, num_steps: int) -> int:
    """Head steps that draw noise and carry a log-prob: all K (uniform) or the first K-1 (final_euler,
    whose last step is a plain Euler step: no noise, no log-prob, never trained)."""
    return num_steps - 1 if kind == "final_euler" else num_steps


def combine_guidance(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    scale: float,
    v_null: torch.Tensor | None = None,
    image_scale: float = 1.0,
) -> torch.Tensor:
    """Classifier-free guidance on the velocity, all [..., D].

    Two branches (text-to-image): v_u + scale (v_c - v_u).
    Three branches (image edit, NextStep-1's `cfg2`): v_uncond is the branch that keeps the input image
    but drops the text, v_null drops both: v_null + image_scale (v_u - v_null) + scale (v_c - v_u).
    At image_scale 1 the two forms agree, so v_null then changes nothing.
    """
    if v_null is None:
        return v_uncond + scale * (v_cond - v_uncond)
    return v_null + image_scale * (v_uncond - v_null) + scale * (v_cond - v_uncond)


@dataclass
class StepResult:
    x_next: torch.Tensor  # [..., D] the next head state (sampled, or the given one when scoring)
    log_prob: torch.Tensor  # [...] log pi(x_next | x) under the step's Gaussian (fp32); 0 for ode
    mean: torch.Tensor  # [..., D] mean of the transition (fp32)
    std: torch.Tensor  # [...] or a CPU scalar when t was a float: per-dim std of the transition (fp32)


def head_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    kind: SdeKind = "sde",
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    reduction: LogProbReduction = "sum",
    cps_noise_level: float = 0.7,
) -> StepResult:
    """One head step x -> x_next that samples (given `noise`) or scores (given `x_next`), never both.

    x, v, noise, x_next: [..., D]; t, t_next: scalars or tensors broadcastable to [..., 1].
    sde: mu = x + ((1+t) v - x) dt, std^2 = 2 (1-t) dt (Euler-Maruyama; NextStep's sampler).
         log pi = -||x'-mu||^2 / (2 std^2) - D/2 log(2 pi std^2), summed (exact) or averaged over D.
    ode: x' = x + v dt, deterministic; log pi reported as 0 (not a stochastic policy).
    cps: coefficient-preserving step (FlowCPS, arXiv 2509.05952) in our time convention:
         d = x + (1-t) v, n = x - t v, s = (1-t') sin(a pi/2), x' = t' d + sqrt((1-t')^2 - s^2) n + s eps;
         log pi := -mean or -sum of (x'-mu)^2 (no division by the variance, as published).
    """
    if (noise is None) == (x_next is None):
        raise ValueError("head_step needs exactly one of noise (to sample) or x_next (to score)")
    xf, vf = x.float(), v.float()
    # Python-float times stay Python floats: no host-to-device copy (and so no sync) per step.
    t, t_next = _time_column(t), _time_column(t_next)
    dt = t_next - t
    if kind == "sde":
        mean = xf + ((1 + t) * vf - xf) * dt
        var = 2.0 * (1.0 - t) * dt
        std = _sqrt(var)
    elif kind == "ode":
        mean = xf + vf * dt
        std = 0.0 * dt
    elif kind == "cps":
        data_est = xf + (1 - t) * vf
        noise_est = xf - t * vf
        std = (1 - t_next) * math.sin(cps_noise_level * math.pi / 2)
        mean = t_next * data_est + _sqrt(_clamp0((1 - t_next) ** 2 - std**2)) * noise_est
    else:
        raise ValueError(f"unknown sde kind {kind!r}")
    if x_next is None:
        x_next_f = mean + std * noise.float()
    else:
        x_next_f = x_next.float()
    sq = (x_next_f - mean) ** 2  # [..., D]
    if kind == "sde":
        per_dim = -sq / (2 * var) - 0.5 * _log(2 * math.pi * var)
        log_prob = per_dim.sum(-1) if reduction == "sum" else per_dim.mean(-1)
    elif kind == "cps":
        log_prob = -sq.sum(-1) if reduction == "sum" else -sq.mean(-1)
    else:
        log_prob = torch.zeros(sq.shape[:-1], dtype=torch.float32, device=x.device)
    out = x_next_f.to(x.dtype) if x_next is None else x_next
    std = std.squeeze(-1) if isinstance(std, torch.Tensor) else torch.tensor(std)
    return StepResult(x_next=out, log_prob=log_prob, mean=mean, std=std)


def _time_column(t: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(t, torch.Tensor):
        t = t.float()
        return t[..., None] if t.ndim > 0 else t
    return float(t)


def _sqrt(x: torch.Tensor | float) -> torch.Tensor | float:
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def _log(x: torch.Tensor | float) -> torch.Tensor | float:
    return x.log() if isinstance(x, torch.Tensor) else math.log(x)


def _clamp0(x: torch.Tensor | float) -> torch.Tensor | float:
    return x.clamp_min(0) if isinstance(x, torch.Tensor) else max(x, 0.0)


KlScale = Literal["exact", "flow_grpo"]


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_p, s^2 I) || N(mu_q, s^2 I)) = ||mu_p - mu_q||^2 / (2 s^2), summed over the D dims.

    means [..., D], std [...] -> [...]. Where s = 0 (a deterministic step: CPS's last step, t' = 1)
    there is no Gaussian to compare and the KL is defined as 0; the step's mean is still trained by
    the surrogate. Both branches stay finite, so neither the value nor its gradient can be NaN.
    """
    sq = ((mean_p.float() - mean_q.float()) ** 2).sum(-1)  # [...]
    var = std.float() ** 2
    stochastic = var > 0
    return torch.where(stochastic, sq / torch.where(stochastic, 2 * var, torch.ones_like(var)), torch.zeros_like(sq))


def flow_grpo_kl_factor(kind: SdeKind, t: torch.Tensor, t_next: torch.Tensor, dim: int) -> torch.Tensor:
    """Factor [K] that turns `gaussian_kl_same_std` into flow_grpo's KL at the same beta.

    flow_grpo averages ||mu_p - mu_q||^2 over the D dims instead of summing (1/D), and for the sde step
    divides by its noise coefficient squared without the step's dt (x dt); its CPS step has no dt in
    the std, so there only 1/D applies. t, t_next [K] -> [K]. At K = 10 uniform sde steps: 0.1 / 64.
    """
    if kind == "sde":
        return (t_next - t).float() / dim
    return torch.full_like(t, 1.0 / dim, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Counter-based noise: every draw is a pure function of (seed, token index, step, dim), so a sample
# depends only on its own seed, never on the batch it runs in, and no host sync or per-sample
# generator loop is needed. Hash: "lowbias32" integer mixer; Box-Muller on two 24-bit uniforms.

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Integer avalanche on values in [0, 2^32) held in int64 (wrapping multiply, then masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_noise(
    seeds: torch.Tensor, token_index: int | torch.Tensor, step: int | torch.Tensor, dim: int
) -> torch.Tensor:
    """Standard normal noise determined by (seed, token_index, step, channel), fp32.

    seeds [B]; step an int -> [B, dim], or a [S] tensor of steps -> [B, S, dim] (one call per token
    draws the noise of all its head steps).
    """
    seeds = seeds.to(torch.int64) & _MASK32
    key = _mix32(seeds ^ 0x9E3779B9)
    token = token_index.to(seeds.device) if isinstance(token_index, torch.Tensor) else token_index
    key = _mix32(key ^ (token & _MASK32))
    if isinstance(step, torch.Tensor):
        salt = (step.to(seeds.device, torch.int64).reshape(-1) * 0x85EBCA6B + 0x27D4EB2F) & _MASK32  # [S]
    else:
        salt = (step * 0x85EBCA6B + 0x27D4EB2F) & _MASK32  # a Python int: no device copy
    key = _mix32(key[:, None] ^ salt)  # [B, S]
    lanes = torch.arange(dim, device=seeds.device, dtype=torch.int64)
    base = (key[..., None] * 2 * dim + 2 * lanes) & _MASK32  # [B, S, dim]
    u1 = ((_mix32(base) >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    u2 = ((_mix32(base + 1) >> 8).float() + 0.5) * (1.0 / (1 << 24))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z if isinstance(step, torch.Tensor) else z[:, 0]


def counter_uniform(seeds: torch.Tensor, index: int, salt: int) -> torch.Tensor:
    """One uniform in (0, 1) per seed, a pure function of (seed, index, salt), fp32: seeds [B] -> [B].

    The same hash as `counter_noise`, keyed apart by `salt` (the text sampler's draws use TEXT_SALT, so
    they never coincide with an image token's noise)."""
    seeds = seeds.to(torch.int64) & _MASK32
    key = _mix32(_mix32(seeds ^ (salt & _MASK32)) ^ (index & _MASK32))
    return ((_mix32(key) >> 8).float() + 0.5) * (1.0 / (1 << 24))


# ---------------------------------------------------------------------------------------------
# Published noise: NextStep's pipelines call set_seed(s) once, then per image token the head draws one
# torch.randn((n, D)) for x^0 and one per SDE step (none for NextStep-1's final Euler step) from the
# device's default generator; row r of the caption-major batch takes draw row r % n, where
# n = num_images_per_caption. So image i of every caption shares its noise.

NoiseKind = Literal["counter", "published"]


class PublishedNoise:
    """That draw order from a torch generator on `device` (CUDA and CPU generators differ, as published).

    A row's seed names its draw row: seeds s, s+1, ..., s+n-1 (image i of each caption takes s+i, the
    layout `nsalign generate` builds) replay the published call `generate_image(..., seed=s)` with
    num_images_per_caption = n. seeds [B] int64; one host read of min/max per batch.
    """

    def __init__(self, seeds: torch.Tensor, dim: int, device: torch.device | str):
        first, last = int(seeds.min()), int(seeds.max())
        self.num_draw_rows = last - first + 1
        if self.num_draw_rows > seeds.numel():
            raise UserError(
                f"noise=published replays one published pipeline call: a batch's seeds must be s, s+1, ... "
                f"(image i of each caption takes s+i); got {seeds.numel()} rows whose seeds span "
                f"{self.num_draw_rows} values"
            )
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(first)
        self.rows = (seeds - first).to(device)  # [B] draw row of each sample
        self.dim, self.device = dim, device

    def draw(self, count: int) -> torch.Tensor:
        """The next `count` draws, one randn((n, D)) call each as published -> [B, count, D] fp32."""
        draws = [
            torch.randn((self.num_draw_rows, self.dim), generator=self.generator, device=self.device)
            for _ in range(count)
        ]
        return torch.stack(draws, dim=1)[self.rows]


# ---------------------------------------------------------------------------------------------
# Flow-matching training targets.


def flow_matching_inputs(x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x1, noise [..., D], t [...] -> (x_t = t x1 + (1-t) e, target v = x1 - e)."""
    tt = t[..., None].to(x1.dtype)
    return tt * x1 + (1 - tt) * noise, x1 - noise


def sample_logit_normal(shape: tuple[int, ...], generator: torch.Generator | None = None, device="cpu"):
    """t = sigmoid(N(0, 1)): the logit-normal training time distribution."""
    return torch.sigmoid(torch.randn(shape, generator=generator, device=device))
