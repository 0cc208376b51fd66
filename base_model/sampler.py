"""Batched KV-cache sampler for NextStep-1.

One backbone pass over the prompts, then token by token: the flow head runs K steps for all
samples at once (both CFG branches in one batch, same x), the token is fed back through
image_in_projector, and one backbone step extends the preallocated cache. Per step there is no host
sync and no Python work that grows with the batch. By default all noise comes from
`counter_noise(seed, token, step)`, so a sample's result depends only on (prompt, seed, settings,
weights); `noise: published` instead replays the published pipelines' torch-generator draws, and
`time_grid: final_euler` the NextStep-1 GitHub release's grid with its final deterministic Euler step
(base_model/flow.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from base_model.flash_attention import AttentionKind, with_sampling_attention
from base_model.flow import (
    LogProbReduction,
    NoiseKind,
    PublishedNoise,
    SdeKind,
    TimeGridKind,
    combine_guidance,
    counter_noise,
    head_step,
    num_sde_steps,
    time_grid,
)
from base_model.model import KVCache, NextStepModel
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, PromptBatch, check_sequence_fits
from base_model.text import CotConfig, TextSample, text_step, text_uniforms
from core.errors import ConfigError

INIT_NOISE_STEP = 0  # counter_noise stream of x^0; head step k uses stream k + 1


@dataclass(frozen=True)
class SamplingConfig:
    image_size: int = 512  # pixels per side (square images)
    cfg_scale: float = 7.5  # guidance on the head velocity; 1.0 disables the uncond branch
    num_head_steps: int = 50  # K flow-head steps per image token
    timestep_shift: float = 1.0
    sde_kind: SdeKind = "sde"  # sde: published Euler-Maruyama; ode: deterministic; cps: FlowCPS
    use_norm: bool = True  # LayerNorm (no affine) over each sampled token before feeding it back
    cps_noise_level: float = 0.7  # `a` of the CPS step, s = (1 - t') sin(a pi / 2)
    negative_prompt: str = ""
    logprob_reduction: LogProbReduction = "sum"  # sum over the 64 dims (exact) or mean
    # captions (and the negative prompt) keep their first N tokens; travels with every RolloutBatch,
    # so the learner re-scores exactly the rows the sampler saw (policy: base_model/sequence.py)
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    # uniform: K steps ending at t = 1, all of sde_kind (NextStep-1.1's sampler; the tiny and shapes
    # results committed here were made with it; the authoritative hub sampler, docs/algorithms.md §3).
    # final_euler: the NextStep-1 GitHub release's `FlowMatchingHead.sample` (an older release), K-1 steps on
    # linspace(0, 0.96, K) then one deterministic Euler step of 0.04 that carries no log-prob and is
    # never trained; set it to reproduce that release's images.
    time_grid: TimeGridKind = "uniform"
    # counter: a pure function of (seed, token, step), whatever the batch. published: the published
    # pipelines' torch-generator draws; a batch's seeds must be s, s+1, ... (flow.PublishedNoise)
    noise: NoiseKind = "counter"
    # the static-shape loop replayed from CUDA graphs (base_model/cuda_graphs.py): same tokens, one graph
    # replay per head loop and per decode step. None: on for a model on CUDA, off elsewhere
    cuda_graphs: bool | None = None
    # torch.compile the static loop's hot calls (the head net, the decode step; base_model/cuda_graphs.py):
    # static shapes, two compiles per batch shape; composed with cuda_graphs (the compiled code is captured)
    compile: bool = False
    # grouped_sdpa: GQA through SDPA (any device). flash: flash-attn's kvcache kernel (CUDA, bf16/fp16,
    # image-only batches; base_model/flash_attention.py). Sampling only: training keeps grouped SDPA
    attention: AttentionKind = "grouped_sdpa"
    # Self-CoT: the model first writes its reasoning as text (`cot` says how), then the image (base_model/text.py)
    self_cot: bool = False
    cot: CotConfig = field(default_factory=CotConfig)

    def validate(self, where: str = "sampling") -> None:
        if self.image_size <= 0 or self.image_size % 16:
            raise ConfigError(f"{where}.image_size: {self.image_size} is not a positive multiple of 16")
        if self.num_head_steps < 1:
            raise ConfigError(f"{where}.num_head_steps: must be >= 1, got {self.num_head_steps}")
        if self.time_grid == "final_euler" and self.num_head_steps < 2:  # its only step would be the Euler one
            raise ConfigError(f"{where}.num_head_steps: time_grid final_euler needs >= 2, got {self.num_head_steps}")
        if self.timestep_shift <= 0:
            raise ConfigError(f"{where}.timestep_shift: must be > 0, got {self.timestep_shift}")
        if not 0.0 <= self.cps_noise_level <= 1.0:
            raise ConfigError(f"{where}.cps_noise_level: must be in [0, 1], got {self.cps_noise_level}")
        if not self.cfg_scale >= 1.0:  # also NaN; below 1 would push away from the prompt (1.0: no CFG)
            raise ConfigError(f"{where}.cfg_scale: must be >= 1 (1.0 disables guidance), got {self.cfg_scale}")
        check_sequence_fits(self.max_prompt_tokens, (self.image_size, self.image_size), None,
                            f"{where}.max_prompt_tokens")  # fmt: skip
        if self.compile and self.self_cot:
            raise ConfigError(f"{where}.compile: the compiled static loop does not run Self-CoT; set it false")
        if self.attention == "flash" and self.self_cot:
            raise ConfigError(f"{where}.attention: flash does not take Self-CoT batches (rows with holes); "
                              "use grouped_sdpa")  # fmt: skip
        self.cot.validate(f"{where}.cot")

    @property
    def text_tokens(self) -> int:
        """Positions the Self-CoT template and reasoning add at most (0 without Self-CoT; CotConfig.text_tokens)."""
        return self.cot.text_tokens if self.self_cot else 0

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def num_scored_steps(self) -> int:
        """S: head steps with a log-prob (and a GRPO loss): K, or K-1 on the final_euler grid."""
        return num_sde_steps(self.time_grid, self.num_head_steps)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, T, 64] fp32 tokens as fed back (after use_norm); decode these
    chains: torch.Tensor | None  # [B, T, K+1, 64] fp32 head states x^0..x^K (RL only)
    # [B, T, S] fp32 log pi(x^{k+1} | x^k) under the sampling policy for the S scored steps k < S
    # (S = K, or K-1 on the final_euler grid: its final Euler step has no log-prob)
    log_probs: torch.Tensor | None
    text: TextSample | None = None  # Self-CoT: the reasoning written before the image


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """use_norm: LayerNorm without affine (eps 1e-6) over the 64-d token."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # NextStepModel.velocity's signature


def guided_velocity(
    model: NextStepModel,
    x: torch.Tensor,
    t: float,
    cond: torch.Tensor,
    cfg_scale: float,
    velocity: Velocity | None = None,
) -> torch.Tensor:
    """x [B, 64]; cond [R, H] with R = B or 2B ([cond | uncond]) -> CFG velocity [B, 64] fp32.
    velocity: model.velocity or a compiled copy of it (sampling.compile; None: model.velocity)."""
    b, r = x.shape[0], cond.shape[0]
    xx = x if r == b else torch.cat([x, x], dim=0)
    tt = torch.full((r,), t, dtype=torch.float32, device=x.device)
    v = (velocity or model.velocity)(xx, tt, cond)
    return v if r == b else combine_guidance(v[:b], v[b:], cfg_scale)


def sample_token(
    model: NextStepModel,
    cond: torch.Tensor,
    seeds: torch.Tensor,
    token_index: int,
    grid: list[float],
    config: SamplingConfig,
    record: bool,
    noise: torch.Tensor | None = None,
    velocity: Velocity | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the K head steps for one image token of every sample.

    cond [R, H]; seeds [B]; noise [B, 1+S, 64] (x^0, then one draw per scored step) or None for the
    counter noise of (seeds, token_index) -> (x^K [B, 64] fp32, chain [B, K+1, 64] | None,
    log_probs [B, S] | None). Steps k >= S (the final_euler grid's last) are deterministic Euler steps.
    velocity: see guided_velocity.
    """
    num_steps = len(grid) - 1
    num_sde = num_sde_steps(config.time_grid, num_steps)
    if noise is None:
        # streams 0..K of this token: x^0, then the noise of each step (the final_euler grid leaves K unused)
        streams = torch.arange(num_steps + 1, device=seeds.device)
        noise = counter_noise(seeds, token_index, streams, model.config.token_dim)  # [B, K+1, 64]
    x = noise[:, INIT_NOISE_STEP]
    chain, logps = ([x], []) if record else (None, None)
    for k in range(num_steps):
        v = guided_velocity(model, x, grid[k], cond, config.cfg_scale, velocity)
        scored = k < num_sde
        eps = noise[:, INIT_NOISE_STEP + 1 + k] if scored else torch.zeros_like(x)
        step = head_step(
            x, v, grid[k], grid[k + 1], config.sde_kind if scored else "ode", noise=eps,
            reduction=config.logprob_reduction, cps_noise_level=config.cps_noise_level,
        )  # fmt: skip
        x = step.x_next
        if record:
            chain.append(x)
            if scored:
                logps.append(step.log_prob)
    if not record:
        return x, None, None
    return x, torch.stack(chain, dim=1), torch.stack(logps, dim=1)


@torch.no_grad()
@with_sampling_attention
def sample_tokens(
    model: NextStepModel,
    batch: PromptBatch,
    seeds: torch.Tensor,
    config: SamplingConfig,
    record_chains: bool = False,
    progress: bool = False,
    prefix_tokens: torch.Tensor | None = None,
) -> SampleResult:
    """Generate every image token of every prompt in `batch` (seeds [B] int64, one per prompt row), with
    the attention config.attention names.

    prefix_tokens [B, m, 64] (as fed back, e.g. a RolloutBatch's tokens[:, :m]): tokens 0..m-1 are
    these, teacher-forced through the cache, and only tokens m.. are sampled (a continuation of a
    trajectory prefix; no chains can be recorded then).
    A Self-CoT batch (`sequence.build_self_cot_batch` without texts: `batch.image_prefix` is set) first
    writes each cond row's reasoning (`write_reasoning`), then the image prefix, then the image.
    """
    if prefix_tokens is not None and record_chains:
        raise ValueError("a continuation of given prefix tokens records no chains")
    device = model.device
    batch = batch.to(device)
    seeds = seeds.to(device)
    if config.uses_guidance and not batch.has_uncond:
        raise ValueError("cfg_scale != 1 needs a prompt batch built with_uncond=True")
    rows, prompt_len, num_tokens = batch.input_ids.shape[0], batch.prompt_len, batch.num_image_tokens
    b = batch.num_prompts
    cot = batch.image_prefix is not None
    prefix_len = len(batch.image_prefix) if cot else 0
    max_len = prompt_len + (config.cot.max_text_tokens + prefix_len if cot else 0) + num_tokens
    cache = KVCache(model.config, rows, max_len, model.dtype, device)
    key_valid = torch.ones((rows, max_len), dtype=torch.bool, device=device)
    key_valid[:, :prompt_len] = batch.attention_mask
    grid = time_grid(config.num_head_steps, config.timestep_shift, kind=config.time_grid).tolist()  # floats: no syncs
    published = PublishedNoise(seeds, model.config.token_dim, device) if config.noise == "published" else None

    all_positions = torch.arange(max_len, device=device)
    hidden = model.backbone(model.embed(batch.input_ids), key_valid, all_positions[:prompt_len], cache,
                            rope_positions=batch.rope_positions)  # fmt: skip
    text, start, rope_start = None, prompt_len, None  # rope_start [R]: RoPE position of image token 0's slot
    if cot:
        next_rope = batch.attention_mask.sum(-1)  # [R] each row's next position
        text, used = write_reasoning(model, batch, hidden[:b, -1], cache, key_valid, next_rope, seeds, config)
        cols = all_positions[prompt_len + used : prompt_len + used + prefix_len]  # [P] cache slots of the prefix
        rope = next_rope[:, None] + torch.arange(prefix_len, device=device)  # [R, P]
        prefix = model.embed(batch.image_prefix[None].expand(rows, -1))
        hidden = model.backbone(prefix, key_valid, cols, cache, rope_positions=rope)
        start, rope_start = prompt_len + used + prefix_len, next_rope + prefix_len
    cond = model.image_condition(hidden[:, -1], token_index=0)  # [R, H]

    tokens, chains, logps = [], [], []
    steps = range(num_tokens)
    if progress:
        steps = tqdm(steps, desc="image tokens", leave=False)
    num_given = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    for j in steps:
        if j < num_given:
            y = prefix_tokens[:, j].to(device=device, dtype=torch.float32)  # [B, 64]
        else:
            noise = None if published is None else published.draw(1 + config.num_scored_steps)  # [B, 1+S, 64]
            x, chain, logp = sample_token(model, cond, seeds, j, grid, config, record_chains, noise)
            y = token_norm(x) if config.use_norm else x  # [B, 64]
        tokens.append(y)
        if record_chains:
            chains.append(chain)
            logps.append(logp)
        if j == num_tokens - 1:
            break
        emb = model.image_in_projector(y.to(model.dtype))  # [B, H]
        emb = emb if rows == b else torch.cat([emb, emb], dim=0)
        pos = all_positions[start + j : start + j + 1]
        rope = None if rope_start is None else (rope_start + j)[:, None]  # [R, 1]
        hidden = model.backbone(emb[:, None], key_valid, pos, cache, rope_positions=rope)
        cond = model.image_condition(hidden[:, -1], token_index=j + 1)
    return SampleResult(
        tokens=torch.stack(tokens, dim=1),
        chains=torch.stack(chains, dim=1) if record_chains else None,
        log_probs=torch.stack(logps, dim=1) if record_chains else None,
        text=text,
    )


def write_reasoning(
    model: NextStepModel,
    batch: PromptBatch,
    last_hidden: torch.Tensor,
    cache: KVCache,
    key_valid: torch.Tensor,
    next_rope: torch.Tensor,
    seeds: torch.Tensor,
    config: SamplingConfig,
) -> tuple[TextSample, int]:
    """Self-CoT: the B cond rows write their reasoning into cache slots prompt_len.. (the uncond rows wait).

    last_hidden [B, H] (the prompt's last position); key_valid [R, max_len] and next_rope [R] are updated
    in place: slot prompt_len + n holds text token n of the rows still writing and is invalid for the others.
    -> (TextSample, slots used). One host sync per text token (has every row stopped?), none per image token.
    """
    b, start, device = batch.num_prompts, batch.prompt_len, last_hidden.device
    max_text = config.cot.max_text_tokens
    special = batch.special
    stop_ids = torch.tensor([special.image_area, special.boi], device=device)
    banned = torch.tensor([special.pad, special.eoi, special.placeholder], device=device)
    pad_id = special.pad  # fed to rows that stopped (their slot is masked); never drawn, so it marks the ends
    ids = torch.full((b, max_text), pad_id, dtype=torch.long, device=device)
    log_probs = torch.zeros((b, max_text + 1), dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows_cache = cache.first_rows(b)
    logits = model.lm_head(last_hidden)  # [B, V]
    used = 0
    for n in range(max_text + 1):
        token, logp, is_stop = text_step(logits, text_uniforms(seeds, n), config.cot, stop_ids, banned)
        log_probs[:, n] = torch.where(done, 0.0, logp)
        done = done | is_stop
        if n == max_text or bool(done.all()):  # the text is cut here: this draw only scores a stop
            log_probs[:, n] = torch.where(is_stop, log_probs[:, n], 0.0)
            break
        writing = ~done
        ids[:, n] = torch.where(writing, token, pad_id)
        key_valid[:b, start + n] = writing
        key_valid[b:, start + n] = False
        hidden = model.backbone(model.embed(ids[:, n : n + 1]), key_valid[:b], torch.arange(start + n, start + n + 1,
                                device=device), rows_cache, rope_positions=next_rope[:b, None])  # fmt: skip
        next_rope[:b] += writing.long()
        logits = model.lm_head(hidden[:, -1])
        used = n + 1
    stopped = done
    lengths = (ids != pad_id).long().sum(-1) if used else torch.zeros(b, dtype=torch.long, device=device)
    ids = ids[:, :used]
    out_ids = torch.where(torch.arange(used, device=device)[None] < lengths[:, None], ids, 0)
    return TextSample(ids=out_ids, lengths=lengths, stopped=stopped, log_probs=log_probs[:, : used + 1]), used
