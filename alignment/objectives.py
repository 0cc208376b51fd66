"""Model-facing objectives: turn a batch and the model into (loss, metrics) for `Learner.step`.

GRPO over recorded head chains (`grpo_objective`) and Diffusion-DPO's per-image flow errors of a pair batch
(`pair_scores`, with the seeded per-token noise `pair_noise`; on Self-CoT pairs each image is conditioned on its
own reasoning, whose log-prob the text term also scores). The maths stays in `alignment.losses` (pure
tensors); this file only runs the teacher-forced passes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alignment.losses import DpoOutput, grpo_loss
from base_model.flow import KlScale, flow_grpo_kl_factor, gaussian_kl_same_std, time_grid
from base_model.model import NextStepModel
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, PromptBatch, build_prompt_batch, build_self_cot_batch
from base_model.teacher_forcing import ChainScores, per_image_flow_error, score_chains, teacher_forced
from base_model.text import CotConfig
from base_model.tokenizer import SpecialIds
from rollout.batch import RolloutBatch
from rollout.prefs_format import PreferencePairs

if TYPE_CHECKING:  # annotations only: transformers is heavy to import
    from transformers import PreTrainedTokenizerBase


@dataclass
class GrpoMicroBatch:
    """One micro batch of a GRPO update: kept samples, their advantages and the cells trained."""

    batch: RolloutBatch  # b samples
    advantages: torch.Tensor  # [b]
    weights: torch.Tensor  # [T, K]
    scale: float  # b * num_micro / num_samples: micro losses of unequal size average per sample


def chain_scores(
    model: NextStepModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    batch: RolloutBatch,
    train_with_guidance: bool,
) -> ChainScores:
    """`model` re-scoring the recorded head chains of `batch` in one teacher-forced pass, on the prompt rows
    the sampler saw (both CFG branches when `train_with_guidance` and the sampling used CFG)."""
    if batch.chains is None or batch.log_probs is None:
        raise ValueError("GRPO needs rollouts recorded with record_chains=True")
    sampling = batch.sampling
    size = (sampling.image_size, sampling.image_size)
    pb = build_prompt_batch(
        tokenizer, ids, batch.prompts, size, with_uncond=train_with_guidance and sampling.uses_guidance,
        negative_prompt=sampling.negative_prompt, max_prompt_tokens=sampling.max_prompt_tokens,
    )  # fmt: skip
    device = next(model.parameters()).device
    return score_chains(model, pb, ids, batch.tokens.to(device), batch.chains.to(device), sampling)


def reference_means(
    ref_model: NextStepModel, tokenizer: PreTrainedTokenizerBase, ids: SpecialIds, batch: RolloutBatch,
    train_with_guidance: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The frozen reference's head means [B, T, S, 64] along the recorded chains (no gradient): what the
    KL term of `grpo_objective` compares the policy's means with."""
    with torch.no_grad():
        return chain_scores(ref_model, tokenizer, ids, batch, train_with_guidance).means


def grpo_objective(
    model: NextStepModel,
    ref_model: NextStepModel | None,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    batch: RolloutBatch,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_eps: float,
    beta: float,
    train_with_guidance: bool = False,
    kl_scale: KlScale = "exact",
    ref_means: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO over recorded head chains: one parallel re-scoring pass (NextStep-1.1), optional KL to a
    frozen reference (`ref_model`, or its `reference_means` computed beforehand, e.g. under
    `Learner.reference()`). advantages [B]; weights [T, K] (trained-part mask times per-step weights).

    kl_scale "exact": the KL summed over the 64 dims with the true step variance; "flow_grpo": that KL
    times `flow_grpo_kl_factor` (mean over dims, sde variance without dt), so flow_grpo's beta applies."""
    sampling = batch.sampling
    scores = chain_scores(model, tokenizer, ids, batch, train_with_guidance)
    device, chains = scores.log_probs.device, batch.chains
    if ref_means is None and ref_model is not None and beta > 0:
        ref_means = reference_means(ref_model, tokenizer, ids, batch, train_with_guidance)
    kl = None
    if ref_means is not None and beta > 0:
        kl = gaussian_kl_same_std(
            scores.means, ref_means.to(device), scores.stds.to(device)[None, None, :]
        )  # [B, T, K]
        if kl_scale == "flow_grpo":
            grid = time_grid(chains.shape[2] - 1, sampling.timestep_shift, device=device, kind=sampling.time_grid)
            grid = grid[: sampling.num_scored_steps + 1]  # [S+1]: the scored steps (final_euler: not the last)
            kl = kl * flow_grpo_kl_factor(sampling.sde_kind, grid[:-1], grid[1:], chains.shape[-1])  # [S]
    old = batch.log_probs.to(device)
    out = grpo_loss(scores.log_probs, old, advantages.to(device), weights.to(device), clip_eps, kl, beta)
    trained = weights.to(device).expand_as(old) > 0
    metrics = {
        "grpo/policy_loss": float(out.policy_loss), "grpo/kl": float(out.kl),
        "grpo/clip_frac": float(out.clip_frac), "grpo/approx_kl": float(out.approx_kl),
        # health check: on an untouched policy the re-scored log-probs equal the rollout's
        "grpo/logprob_diff": float((scores.log_probs.detach() - old)[trained].abs().mean()),
    }  # fmt: skip
    return out.loss, metrics


# -- Diffusion-DPO (docs/algorithms.md §8) -------------------------------------------------------------

TRAIN_STREAM, EVAL_STREAM = 0, 1  # the pair-noise streams of trained and held-out pairs


def pair_noise(seed: int, stream: int, position: int, num_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [T] ~ sigmoid(N(0,1)), e [T, D] ~ N(0, I)) of one pair, a pure function of (seed, stream, position)."""
    digest = hashlib.sha1(f"{seed}:{stream}:{position}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.sigmoid(torch.randn(num_tokens, generator=g))
    return t, torch.randn(num_tokens, dim, generator=g)


@dataclass
class PairBatch:
    """N preference pairs of one micro batch with the noise their winner and loser share."""

    prompts: list[str]  # [N]
    chosen: torch.Tensor  # [N, T, 64] winner tokens y_w
    rejected: torch.Tensor  # [N, T, 64] loser tokens y_l
    t: torch.Tensor  # [N, T] per-token flow times, shared by winner, loser, policy and reference
    noise: torch.Tensor  # [N, T, 64] per-token noise e_j, shared likewise
    # Self-CoT pairs (PreferencePairs.self_cot): each image's reasoning t_w / t_l, written with `cot`'s template;
    # None for image-only pairs
    chosen_text_ids: list[list[int]] | None = None  # [N] token ids
    rejected_text_ids: list[list[int]] | None = None
    chosen_text_stopped: torch.Tensor | None = None  # [N] bool: the reasoning ended with a stop token
    rejected_text_stopped: torch.Tensor | None = None
    cot: CotConfig | None = None

    @property
    def self_cot(self) -> bool:
        return self.chosen_text_ids is not None


def make_batch(pairs: PreferencePairs, indices: list[int], positions: list[int], seed: int, stream: int) -> PairBatch:
    """Pairs `indices` of a PreferencePairs (with their reasoning when it has some); `positions` (one per
    pair) seed their (t, e)."""
    _, num_tokens, dim = pairs.chosen_tokens.shape
    noise = [pair_noise(seed, stream, p, num_tokens, dim) for p in positions]
    text = {}
    if pairs.self_cot:
        text = dict(
            chosen_text_ids=[pairs.chosen_text_ids[i] for i in indices],
            rejected_text_ids=[pairs.rejected_text_ids[i] for i in indices],
            chosen_text_stopped=pairs.chosen_text_stopped[indices],
            rejected_text_stopped=pairs.rejected_text_stopped[indices], cot=pairs.cot,
        )  # fmt: skip
    return PairBatch(
        prompts=[pairs.prompts[i] for i in indices],
        chosen=pairs.chosen_tokens[indices], rejected=pairs.rejected_tokens[indices],
        t=torch.stack([n[0] for n in noise]), noise=torch.stack([n[1] for n in noise]), **text,
    )  # fmt: skip


@dataclass
class PairScores:
    """What one model gives a PairBatch in one teacher-forced pass."""

    err_w: torch.Tensor  # [N] fp32 per-image flow error l(y_w) (Self-CoT: conditioned on t_w)
    err_l: torch.Tensor  # [N] l(y_l)
    # Self-CoT with the text term: log pi(t | c) of each reasoning, summed over its tokens and stop event [N]
    text_w: torch.Tensor | None = None
    text_l: torch.Tensor | None = None


def pair_prompt_batch(
    tokenizer: PreTrainedTokenizerBase, ids: SpecialIds, batch: PairBatch, image_size: int, max_prompt_tokens: int
) -> PromptBatch:
    """The 2N rows [winners | losers] of a pair batch, without CFG: the captions alone, or (Self-CoT) each
    caption in the CoT template followed by that image's own reasoning, so every image is conditioned on the
    text it was drawn after."""
    size = (image_size, image_size)
    if not batch.self_cot:
        return build_prompt_batch(tokenizer, ids, batch.prompts * 2, size, False, max_prompt_tokens=max_prompt_tokens)
    texts = batch.chosen_text_ids + batch.rejected_text_ids
    return build_self_cot_batch(tokenizer, ids, batch.prompts * 2, size, False, batch.cot, texts=texts,
                                max_prompt_tokens=max_prompt_tokens)  # fmt: skip


def pair_scores(
    model: NextStepModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    batch: PairBatch,
    image_size: int,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    score_text: bool = False,
) -> PairScores:
    """Per-image flow errors (and, with `score_text` on Self-CoT pairs, the reasoning log-probs) of the N pairs
    from ONE teacher-forced pass over 2N rows."""
    if score_text and not batch.self_cot:
        raise ValueError("reasoning log-probs need Self-CoT pairs")
    device = model.device
    prompt_batch = pair_prompt_batch(tokenizer, ids, batch, image_size, max_prompt_tokens)
    tokens = torch.cat([batch.chosen, batch.rejected]).to(device)  # [2N, T, 64]
    stopped = torch.cat([batch.chosen_text_stopped, batch.rejected_text_stopped]) if score_text else None  # [2N]
    forced = teacher_forced(model, prompt_batch, ids, tokens, text_stopped=stopped)
    t = batch.t.repeat(2, 1).to(device)  # [2N, T]: the same (t, e) for winner and loser
    noise = batch.noise.repeat(2, 1, 1).to(device)  # [2N, T, 64]
    err = per_image_flow_error(model, forced.image_cond, tokens, t, noise)  # [2N] fp32
    n = len(batch.prompts)
    if not score_text:
        return PairScores(err[:n], err[n:])
    text = forced.text_log_probs.sum(-1)  # [2N]: tokens and stop event (TextSample.log_probs' layout)
    return PairScores(err[:n], err[n:], text[:n], text[n:])


DPO_METRICS = ("loss", "implicit_accuracy", "margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l")
TEXT_DPO_METRICS = ("image_margin", "text_margin", "text_logratio_chosen", "text_logratio_rejected")


def dpo_metric_names(text_loss: bool) -> tuple[str, ...]:
    """The DpoOutput fields logged as metrics (the text term's too when it is on)."""
    return DPO_METRICS + (TEXT_DPO_METRICS if text_loss else ())


def dpo_metrics(out: DpoOutput, area: str) -> dict[str, float]:
    """DpoOutput -> {area/loss, area/implicit_accuracy, area/margin, area/mse_w, ...} (+ area/text_margin, ...
    when it carries the text term)."""
    names = dpo_metric_names(out.text_margin is not None)
    return {f"{area}/{name}": float(getattr(out, name).detach()) for name in names}
