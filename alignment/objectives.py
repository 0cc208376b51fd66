"""Model-facing objectives: turn a batch and the model into (loss, metrics) for `Learner.step`.

The maths stays in `alignment.losses` (pure tensors); this file only runs the teacher-forced passes.
"""

from __future__ import annotations

import torch

from alignment.losses import grpo_loss
from base_model.flow import KlScale, flow_grpo_kl_factor, gaussian_kl_same_std, time_grid
from base_model.model import NextStepModel
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import score_chains
from base_model.tokenizer import SpecialIds
from rollout.batch import RolloutBatch


def grpo_objective(
    model: NextStepModel,
    ref_model: NextStepModel | None,
    tokenizer,
    ids: SpecialIds,
    batch: RolloutBatch,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_eps: float,
    beta: float,
    train_with_cfg: bool = False,
    kl_scale: KlScale = "exact",
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO over recorded head chains: one parallel re-scoring pass (NextStep-1.1), optional KL to a
    frozen reference. advantages [B]; weights [T, K] (trained-part mask times per-step weights).

    kl_scale "exact": the KL summed over the 64 dims with the true step variance; "flow_grpo": that KL
    times `flow_grpo_kl_factor` (mean over dims, sde variance without dt), so flow_grpo's beta applies."""
    if batch.chains is None or batch.log_probs is None:
        raise ValueError("GRPO needs rollouts recorded with record_chains=True")
    sampling = batch.sampling
    use_cfg = train_with_cfg and sampling.uses_cfg
    size = (sampling.image_size, sampling.image_size)
    pb = build_prompt_batch(
        tokenizer,
        ids,
        batch.prompts,
        size,
        with_uncond=use_cfg,
        negative_prompt=sampling.negative_prompt,
        max_prompt_tokens=sampling.max_prompt_tokens,
    )  # the rows the sampler saw
    device = next(model.parameters()).device
    tokens, chains = batch.tokens.to(device), batch.chains.to(device)
    scores = score_chains(model, pb, ids, tokens, chains, sampling)
    kl = None
    if ref_model is not None and beta > 0:
        with torch.no_grad():
            ref = score_chains(ref_model, pb, ids, tokens, chains, sampling)
        kl = gaussian_kl_same_std(scores.means, ref.means, scores.stds.to(device)[None, None, :])  # [B, T, K]
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
