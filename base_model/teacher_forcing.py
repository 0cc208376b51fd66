"""Teacher-forced passes over finished sequences: SFT losses, per-image flow-matching errors (the
building block of Diffusion-DPO) and the parallel re-scoring of recorded head chains (RL).

Hidden state at position p conditions token p+1, so image token j is conditioned by the position
just before its placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from base_model.flow import (
    combine_guidance,
    flow_matching_inputs,
    head_step,
    num_sde_steps,
    sample_logit_normal,
    time_grid,
)
from base_model.model import NextStepModel
from base_model.sampler import SamplingConfig
from base_model.sequence import PromptBatch, append_image_block, block_rope_positions
from base_model.text import text_log_prob
from base_model.tokenizer import SpecialIds


@dataclass
class TeacherForced:
    image_cond: torch.Tensor  # [R, T, H] head condition image_out_projector(h_j) for every image token
    text_ce: torch.Tensor  # [] mean next-token cross-entropy over text targets (0 when there are none)
    num_text_targets: int
    # Self-CoT: [B, N+1] log-probs of each cond row's reasoning in TextSample.log_probs' layout (None unless asked)
    text_log_probs: torch.Tensor | None = None


def teacher_forced(
    model: NextStepModel,
    batch: PromptBatch,
    ids: SpecialIds,
    tokens: torch.Tensor,
    compute_text_ce: bool = False,
    text_stopped: torch.Tensor | None = None,
) -> TeacherForced:
    """One parallel pass over prompt (+ Self-CoT reasoning) + image block. tokens [B, T, 64] (repeated for
    uncond rows). text_stopped [B] bool (a Self-CoT batch from `build_self_cot_batch` with texts): also score
    each reasoning as the sampler did (`reasoning_log_probs`)."""
    batch = batch.to(model.device)
    input_ids, mask = append_image_block(batch, ids)
    rows, t = input_ids.shape[0], batch.num_image_tokens
    img = tokens if rows == tokens.shape[0] else torch.cat([tokens, tokens], dim=0)
    hidden = model.forward_sequence(input_ids, mask, img.to(model.device), block_rope_positions(batch))  # [R, L+T+1, H]
    start = batch.prompt_len  # index of the first placeholder
    cond = model.image_condition(hidden[:, start - 1 : start - 1 + t], token_index=0)  # [R, T, H]
    text_ce, n_text = hidden.new_zeros((), dtype=torch.float32), 0
    if compute_text_ce:
        # targets: real (unpadded) text tokens at positions 1..L-1 plus <|end_of_image|>
        targets = input_ids[:, 1:]
        is_text = mask[:, 1:] & mask[:, :-1] & (targets != ids.placeholder)  # [R, L+T]
        n_text = int(is_text.sum())
        if n_text:
            logits = model.lm_head(hidden[:, :-1][is_text])  # [N_text, V]
            text_ce = F.cross_entropy(logits.float(), targets[is_text])
    text_lp = None
    if text_stopped is not None:
        text_lp = reasoning_log_probs(model, hidden, input_ids, batch, ids, text_stopped.to(hidden.device))
    return TeacherForced(image_cond=cond, text_ce=text_ce, num_text_targets=n_text, text_log_probs=text_lp)


def reasoning_log_probs(
    model: NextStepModel,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    batch: PromptBatch,
    ids: SpecialIds,
    stopped: torch.Tensor,
) -> torch.Tensor:
    """The cond rows' reasoning scored from a teacher-forced pass, in TextSample.log_probs' layout.

    hidden [R, L', H], input_ids [R, L'] of the finished sequence; row i's n_i text tokens end at column
    text_end, where <|image_area|> follows: token k sits at column text_end - n_i + k and is predicted by the
    column before it; k = n_i is the stop event, scored when stopped[i]. -> [B, N+1] fp32, N = max n_i.
    """
    if batch.text_lengths is None or batch.text_end is None:
        raise ValueError("reasoning log-probs need a Self-CoT batch built with its texts")
    b, lengths = batch.num_prompts, batch.text_lengths.to(hidden.device)  # [B]
    n = int(lengths.max()) if b else 0
    k = torch.arange(n + 1, device=hidden.device)[None]  # [1, N+1]
    column = batch.text_end - lengths[:, None] + k  # [B, N+1] column of token k
    scored = (k < lengths[:, None]) | ((k == lengths[:, None]) & stopped[:, None])
    column = column.clamp(1, input_ids.shape[1] - 1)
    h = hidden[:b].gather(1, (column - 1)[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, N+1, H]
    targets = input_ids[:b].gather(1, column)  # [B, N+1]
    stop_ids = torch.tensor([ids.image_area, ids.boi], device=hidden.device)
    out = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
    out[scored] = text_log_prob(model.text_log_pi(h[scored]), targets[scored], stop_ids)
    return out


def flow_errors(
    model: NextStepModel, cond: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-token flow-matching error ||head(x_t, t, c) - (y - e)||^2 / D for given (t, e).

    cond [N, T, H]; tokens, noise [N, T, 64]; t [N, T] -> [N, T] fp32.
    """
    x_t, target = flow_matching_inputs(tokens.float(), t.float(), noise.float())
    n, tt, d = tokens.shape
    v = model.velocity(x_t.reshape(-1, d), t.reshape(-1), cond.reshape(n * tt, -1))
    return ((v - target.reshape(-1, d)) ** 2).mean(-1).reshape(n, tt)


def per_image_flow_error(
    model: NextStepModel, cond: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Diffusion-DPO's l(y): the mean over tokens of `flow_errors`. -> [N] fp32."""
    return flow_errors(model, cond, tokens, t, noise).mean(-1)


def flow_matching_loss(
    model: NextStepModel,
    cond: torch.Tensor,
    tokens: torch.Tensor,
    batch_mul: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training FM loss: every token repeated `batch_mul` times with t ~ logit-normal, e ~ N(0, I).

    cond [N, T, H]; tokens [N, T, 64] -> scalar (mean over tokens, repeats and dims).
    """
    cond_r = cond.repeat_interleave(batch_mul, dim=0)
    tok_r = tokens.repeat_interleave(batch_mul, dim=0).float()
    t = sample_logit_normal(tok_r.shape[:2], generator=generator, device="cpu").to(tok_r.device)
    noise = torch.randn(tok_r.shape, generator=generator, device="cpu").to(tok_r.device)
    return flow_errors(model, cond_r, tok_r, t, noise).mean()


@dataclass
class SftLoss:
    loss: torch.Tensor  # [] lm_loss_weight * text CE + im_loss_weight * FM
    text_ce: torch.Tensor
    flow_matching: torch.Tensor
    text_log_probs: torch.Tensor | None = None  # [B, N+1] Self-CoT rows: each reasoning's log-probs (detached)


def sft_loss(
    model: NextStepModel,
    batch: PromptBatch,
    ids: SpecialIds,
    tokens: torch.Tensor,
    generator: torch.Generator | None = None,
    lm_loss_weight: float | None = None,
) -> SftLoss:
    """NextStep-1's training loss on (caption, image tokens) pairs: 0.01 CE(text) + 1.0 FM(image)
    (`lm_loss_weight` replaces the config's 0.01). On a Self-CoT batch (`build_self_cot_batch` with texts) the
    text CE covers each reasoning and its stop (the <|image_area|> after it); text_log_probs scores them."""
    if batch.has_uncond:
        raise ValueError("SFT batches carry no unconditional rows")
    stopped = None if batch.text_lengths is None else torch.ones(batch.num_prompts, dtype=torch.bool)
    out = teacher_forced(model, batch, ids, tokens, compute_text_ce=True, text_stopped=stopped)
    fm = flow_matching_loss(model, out.image_cond, tokens, model.config.fm_head_batch_mul, generator)
    config = model.config
    weight = config.lm_loss_weight if lm_loss_weight is None else lm_loss_weight
    loss = weight * out.text_ce + config.im_loss_weight * fm
    text_lp = None if out.text_log_probs is None else out.text_log_probs.detach()
    return SftLoss(loss=loss, text_ce=out.text_ce.detach(), flow_matching=fm.detach(), text_log_probs=text_lp)


@dataclass
class ChainScores:
    """The S scored steps k < S of each chain (S = K, or K-1 on the final_euler grid, whose last step is
    a deterministic Euler step with no log-prob: it is neither scored nor trained)."""

    log_probs: torch.Tensor  # [B, T, S] log pi_theta(x^{k+1} | x^k), fp32
    means: torch.Tensor  # [B, T, S, 64] transition means (for the KL to a reference)
    stds: torch.Tensor  # [S] transition stds


def score_chains(
    model: NextStepModel,
    batch: PromptBatch,
    ids: SpecialIds,
    tokens: torch.Tensor,
    chains: torch.Tensor,
    config: SamplingConfig,
) -> ChainScores:
    """Re-score recorded head chains with ONE teacher-forced pass (gradients flow when enabled).

    tokens [B, T, 64] (as fed back); chains [B, T, K+1, 64], sampled on `config.time_grid`, whose first S
    steps are scored. CFG is used iff `batch.has_uncond` (NextStep-1.1 trains without CFG: pass a batch
    built with_uncond=False).
    """
    tf = teacher_forced(model, batch, ids, tokens)
    b, t, k1, d = chains.shape
    k = num_sde_steps(config.time_grid, k1 - 1)  # S: the final_euler grid's final Euler step is left out
    grid = time_grid(k1 - 1, config.timestep_shift, device=chains.device, kind=config.time_grid)[: k + 1]  # [S+1]
    x = chains[:, :, :k].reshape(-1, d)  # [B*T*S, 64]
    x_next = chains[:, :, 1 : k + 1].reshape(-1, d)
    ts = grid[:k].repeat(b * t)  # [B*T*S]
    ts_next = grid[1:].repeat(b * t)

    def cond_rows(c: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B*T*S, H]
        return c[:, :, None].expand(-1, -1, k, -1).reshape(b * t * k, -1)

    v = model.velocity(x, ts, cond_rows(tf.image_cond[:b]))
    if batch.has_uncond:
        v_u = model.velocity(x, ts, cond_rows(tf.image_cond[b:]))
        v = combine_guidance(v, v_u, config.cfg_scale)
    step = head_step(
        x, v, ts, ts_next, config.sde_kind, x_next=x_next,
        reduction=config.logprob_reduction, cps_noise_level=config.cps_noise_level,
    )  # fmt: skip
    stds = step.std.reshape(b, t, k)[0, 0] if step.std.ndim else step.std.expand(k)
    return ChainScores(log_probs=step.log_prob.reshape(b, t, k), means=step.mean.reshape(b, t, k, d), stds=stds)
