"""Alignment losses as pure tensor functions: Diffusion-DPO for the flow head, GRPO over head steps,
and the trained-part masks of prefix-restricted RL. No config object crosses these functions.

Shapes: B samples, T image tokens, K head steps, P prompts x G samples per prompt (B = P * G).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Diffusion-DPO (Wallace et al., arXiv 2311.12908), on per-image flow-matching errors.


@dataclass
class DpoOutput:
    loss: torch.Tensor  # []
    implicit_accuracy: torch.Tensor  # [] share of pairs with a positive margin z
    margin: torch.Tensor  # [] mean z: the image margin, plus the text margin when the text term is on
    mse_w: torch.Tensor  # [] policy error on winners
    mse_l: torch.Tensor
    ref_mse_w: torch.Tensor
    ref_mse_l: torch.Tensor
    # Self-CoT text term (docs/algorithms.md §8.1); None without it
    image_margin: torch.Tensor | None = None  # [] mean of -(beta/2) [(l_w - l_ref_w) - (l_l - l_ref_l)]
    text_margin: torch.Tensor | None = None  # [] mean of text_beta [(log pi(t_w) - log pi_ref(t_w)) - (... t_l)]
    text_logratio_chosen: torch.Tensor | None = None  # [] mean of log pi(t_w) - log pi_ref(t_w)
    text_logratio_rejected: torch.Tensor | None = None  # [] mean of log pi(t_l) - log pi_ref(t_l)


def diffusion_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    chosen_fm_weight: float = 0.0,
    text_w: torch.Tensor | None = None,
    text_l: torch.Tensor | None = None,
    ref_text_w: torch.Tensor | None = None,
    ref_text_l: torch.Tensor | None = None,
    text_beta: float = 0.1,
) -> DpoOutput:
    """L = -log sigmoid(z) + lambda l_w with z = -(beta/2) [(l_w - l_ref_w) - (l_l - l_ref_l)], errors [N] from
    the SAME (t, e).

    Equals log 2 (+ lambda mean l_w) when the policy equals the reference. lambda = `chosen_fm_weight`:
    the flow-matching loss on the winners, the diffusion counterpart of the NLL term that RPO (arXiv
    2404.19733) adds to DPO; it stops the known failure where DPO raises both errors (both images
    get less likely) while their difference grows.

    Self-CoT text term (all four given): the reasoning log-probs text_w, text_l [N] (log pi(t | c) summed over
    each reasoning) and the reference's add the standard DPO margin of the text to z, one sigmoid over the
    joint likelihood of text then image (docs/algorithms.md §8.1):
        z += text_beta [(log pi(t_w) - log pi_ref(t_w)) - (log pi(t_l) - log pi_ref(t_l))]
    """
    image = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))  # [N]
    text = (text_w, text_l, ref_text_w, ref_text_l)
    if any(x is None for x in text) and any(x is not None for x in text):
        raise ValueError("the text term needs text_w, text_l, ref_text_w and ref_text_l together")
    inside, parts = image, {}
    if text_w is not None:
        ratio_w, ratio_l = text_w - ref_text_w, text_l - ref_text_l  # [N] log pi / pi_ref of each reasoning
        text_margin = text_beta * (ratio_w - ratio_l)  # [N]
        inside = image + text_margin
        parts = dict(
            image_margin=image.detach().mean(), text_margin=text_margin.detach().mean(),
            text_logratio_chosen=ratio_w.detach().mean(), text_logratio_rejected=ratio_l.detach().mean(),
        )  # fmt: skip
    return DpoOutput(
        loss=-F.logsigmoid(inside).mean() + chosen_fm_weight * err_w.mean(),
        implicit_accuracy=(inside.detach() > 0).float().mean(),
        margin=inside.detach().mean(),
        mse_w=err_w.detach().mean(),
        mse_l=err_l.detach().mean(),
        ref_mse_w=ref_err_w.detach().mean(),
        ref_mse_l=ref_err_l.detach().mean(),
        **parts,
    )


# ---------------------------------------------------------------------------------------------
# GRPO (Flow-GRPO, arXiv 2505.05470, adapted to NextStep's head SDE).


AdvantageScale = Literal["group", "global_std", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-4, clip: float = 5.0, scale: AdvantageScale = "group"
) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G] = (r - mean_group) / (std + eps), clipped to [-clip, clip].

    scale "group": std of each group (GRPO); "global_std": the std of every raw reward of the batch,
    exactly flow_grpo's `global_std` (its PerPromptStatTracker), so a group whose rewards barely differ
    keeps small advantages; "batch": the RMS of the within-group-centred rewards (between-group spread
    left out, so it is never larger than global_std); "none": centred rewards only.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "group":
        centred = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)  # std [P, 1]
    elif scale == "global_std":
        centred = centred / (rewards.std(unbiased=False) + eps)  # std []
    elif scale == "batch":
        centred = centred / (centred.pow(2).mean().sqrt() + eps)  # RMS []
    elif scale != "none":
        raise ValueError(f"advantage scale must be 'group', 'global_std', 'batch' or 'none', got {scale!r}")
    return centred.clamp(-clip, clip)


def keep_groups(rewards: torch.Tensor, min_std: float, max_mean: float | None) -> torch.Tensor:
    """NextStep-1.1's group filter: rewards [P, G] -> keep [P] bool (std >= min_std and mean <= max_mean)."""
    keep = rewards.std(dim=1, unbiased=False) >= min_std
    if max_mean is not None:
        keep &= rewards.mean(dim=1) <= max_mean
    return keep


@dataclass
class GrpoOutput:
    loss: torch.Tensor  # []
    policy_loss: torch.Tensor  # []
    kl: torch.Tensor  # [] KL to the reference, weighted and normalised as the loss (0 without a reference)
    clip_frac: torch.Tensor  # [] share of trained cells whose ratio left [1-eps, 1+eps]
    approx_kl: torch.Tensor  # [] mean of (ratio - 1) - log ratio (k3 estimator, old vs new)


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_eps: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> GrpoOutput:
    """Clipped surrogate over trained (token, step) cells.

    log_probs, old_log_probs [B, T, K]; advantages [B]; weights [T, K] or [B, T, K] (0 = not trained,
    per-cell weights otherwise); kl [B, T, K] Gaussian KL to the reference, added as beta * KL.
    One generation step is one image token of one sample (a row (b, t)); its cells are summed with their
    weights and the loss is the mean over trained rows (NextFlow: each step's loss weighted by k_t):
    loss = sum_{b,t,k} w ( -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta KL ) / #{(b, t) with a trained cell}.
    With w = 1/n_t (`step_weights`, alpha 1) this is the mean over trained cells (Flow-GRPO).
    Untrained cells never reach the loss, even when their KL is not finite. Metrics are plain shares.
    """
    w = weights.expand_as(log_probs).to(log_probs.dtype)  # [B, T, K]
    trained = w > 0
    rows = trained.any(dim=-1).sum().clamp_min(1)  # [] trained generation steps
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    zeros = torch.zeros_like(w)
    policy_loss = -torch.where(trained, w * surrogate, zeros).sum() / rows
    kl_term = log_probs.new_zeros(())
    if kl is not None:
        kl_term = torch.where(trained, w * kl.expand_as(w), zeros).sum() / rows
    with torch.no_grad():
        cells = trained.sum().clamp_min(1)
        clip_frac = (trained & ((ratio - 1).abs() > clip_eps)).sum() / cells
        approx_kl = torch.where(trained, (ratio - 1) - log_ratio, zeros).sum() / cells
    return GrpoOutput(
        loss=policy_loss + beta * kl_term, policy_loss=policy_loss.detach(), kl=kl_term.detach(),
        clip_frac=clip_frac, approx_kl=approx_kl,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prefix-restricted RL (NextFlow arXiv 2601.02204; "VAR RL Done Right" arXiv 2601.02256): which
# part of the (token j, head step k) grid gets a loss. The rest is still sampled, never trained.

MaskKind = Literal["full", "token_prefix", "step_prefix", "step_window"]


def trained_mask(
    kind: MaskKind, num_tokens: int, num_steps: int, prefix: int = 0, window_start: int = 0, window: int = 0
) -> torch.Tensor:
    """[T, K] bool grid of trained cells.

    full: everything; token_prefix: the first `prefix` image tokens (raster order), all steps;
    step_prefix: the first `prefix` head steps of every token (the coarse part of its denoising);
    step_window: head steps [window_start, window_start + window) of every token (MixGRPO).
    """
    mask = torch.zeros(num_tokens, num_steps, dtype=torch.bool)
    if kind == "full":
        mask[:] = True
    elif kind == "token_prefix":
        mask[:prefix] = True
    elif kind == "step_prefix":
        mask[:, :prefix] = True
    elif kind == "step_window":
        mask[:, window_start : window_start + window] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask


def step_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """NextFlow's k_t = 1 / n_t^alpha per generation step t, n_t = cells trained at that step.

    In raster order one generation step is one image token, so n_t is the number of trained head
    steps of token t. mask [T, K] bool -> weights [T, K] (0 where untrained). `grpo_loss` sums a
    token's weighted cells and averages over tokens, so a token contributes n_t^(1 - alpha) times its
    mean cell loss: alpha 1 is the plain mean over cells, alpha 0 the sum over its head steps.
    """
    n = mask.sum(dim=1, keepdim=True).clamp_min(1).float()  # [T, 1]
    return mask.float() / n**alpha


def prefix_phase(update_index: int, prefix_updates: int = 3, suffix_updates: int = 1) -> Literal["prefix", "suffix"]:
    """The alternation schedule of arXiv 2601.02256: `prefix_updates` prefix steps, then `suffix_updates`."""
    cycle = prefix_updates + suffix_updates
    return "prefix" if update_index % cycle < prefix_updates else "suffix"


def soft_value(returns: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """Value of a prefix from K continuations: V = eta * log mean_k exp(R_k / eta). returns [..., K] -> [...]."""
    k = returns.shape[-1]
    return eta * (torch.logsumexp(returns / eta, dim=-1) - torch.log(torch.tensor(float(k))))
