"""GRPO objective on tiny rollouts: untouched-policy health check, gradients, KL."""

import copy

import pytest
import torch

from alignment.losses import step_weights, trained_mask
from alignment.objectives import grpo_objective
from base_model.sampler import SamplingConfig
from rollout.prompts import Prompt, prompt_id
from rollout.worker import RolloutWorker

SAMPLING = SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4)


@pytest.fixture(scope="module")
def rollout():
    w = RolloutWorker("tiny", SAMPLING)
    batch = w.rollout([Prompt(prompt_id("a red circle"), "a red circle")], 3, record_chains=True)
    return w, batch


def test_untouched_policy_ratio_is_one_and_gradients_reach_backbone_and_head(rollout):
    w, batch = rollout
    model = w.bundle.model
    adv = torch.tensor([1.0, -1.0, 0.5])
    weights = step_weights(trained_mask("full", 16, 4), alpha=1.0)  # 1/4 a cell: the mean over cells
    loss, m = grpo_objective(model, None, w.bundle.tokenizer, w.bundle.ids, batch, adv, weights, 1e-4, 0.0)
    assert m["grpo/logprob_diff"] < 2e-5 and m["grpo/clip_frac"] == 0.0
    assert float(loss) == pytest.approx(-float(adv.mean()), abs=1e-5)  # ratio 1: -mean(A)
    loss.backward()
    assert model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.image_head.net.input_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_cfg_rollouts_are_rescored_with_both_branches_only_when_asked():
    """Rollouts sampled at cfg 3 record the guided policy's log-probs: re-scored with train_with_guidance they
    match (ratio 1); re-scored on the conditional branch alone they do not (why the GRPO config refuses it)."""
    w = RolloutWorker("tiny", SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=4))
    batch = w.rollout([Prompt(prompt_id("a red circle"), "a red circle")], 2, record_chains=True)
    args = (w.bundle.model, None, w.bundle.tokenizer, w.bundle.ids, batch, torch.zeros(2),
            trained_mask("full", 16, 4).float(), 1e-4, 0.0)  # fmt: skip
    _, guided = grpo_objective(*args, train_with_guidance=True)
    _, cond_only = grpo_objective(*args, train_with_guidance=False)
    assert guided["grpo/logprob_diff"] < 2e-3 and guided["grpo/clip_frac"] == 0.0
    assert cond_only["grpo/logprob_diff"] > 100 * max(guided["grpo/logprob_diff"], 1e-6)
    assert cond_only["grpo/clip_frac"] > 0.3  # most cells outside the trust region before any update


def test_kl_to_an_identical_reference_is_zero_and_positive_after_a_change(rollout):
    w, batch = rollout
    model = w.bundle.model
    ref = copy.deepcopy(model)
    weights = trained_mask("step_prefix", 16, 4, prefix=2).float()
    args = (w.bundle.tokenizer, w.bundle.ids, batch, torch.zeros(3), weights, 1e-4, 0.1)
    _, m = grpo_objective(model, ref, *args)
    assert m["grpo/kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ref.image_head.net.final_layer.linear.bias.add_(0.1)
    _, m2 = grpo_objective(model, ref, *args)
    assert m2["grpo/kl"] > 1e-4


def _chain_log_probs(model, w, batch) -> torch.Tensor:
    """Sum of every recorded step's log-prob per sample [B] under `model` (no CFG, as in training)."""
    from base_model.sequence import build_prompt_batch
    from base_model.teacher_forcing import score_chains

    pb = build_prompt_batch(w.bundle.tokenizer, w.bundle.ids, batch.prompts, (64, 64), with_uncond=False)
    with torch.no_grad():
        return score_chains(model, pb, w.bundle.ids, batch.tokens, batch.chains, SAMPLING).log_probs.sum((1, 2))


def _after_one_sgd_step(w, batch, adv: torch.Tensor, lr: float = 1e-4):
    model = copy.deepcopy(w.bundle.model)
    weights = trained_mask("full", 16, 4).float()
    loss, _ = grpo_objective(model, None, w.bundle.tokenizer, w.bundle.ids, batch, adv, weights, 10.0, 0.0)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    return model


def test_one_gradient_step_moves_likelihood_toward_the_positive_advantage(rollout):
    """The sign check of the whole objective: after one small SGD step on the GRPO loss with A = [+1, -1, 0],
    the chain log-likelihood of sample 0 gains on sample 1 (first order: sum_i A_i dlogp_i = lr |grad|^2 > 0);
    the opposite advantages move it the other way."""
    w, batch = rollout
    before = _chain_log_probs(w.bundle.model, w, batch)
    adv = torch.tensor([1.0, -1.0, 0.0])
    gain = _chain_log_probs(_after_one_sgd_step(w, batch, adv), w, batch) - before  # [3]
    assert float(gain[0] - gain[1]) > 0
    gain = _chain_log_probs(_after_one_sgd_step(w, batch, -adv), w, batch) - before
    assert float(gain[0] - gain[1]) < 0


def test_flow_grpo_kl_scale_is_the_exact_kl_times_dt_over_d(rollout):
    """K = 4 uniform sde steps (dt = 0.25), D = 64: every step's flow_grpo KL is the exact one times
    0.25 / 64, so the reported KL (a weighted sum of cells) is 64 / 0.25 = 256 times smaller."""
    w, batch = rollout
    model = w.bundle.model
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.image_head.net.final_layer.linear.bias.add_(0.1)
    args = (w.bundle.tokenizer, w.bundle.ids, batch, torch.zeros(3), trained_mask("full", 16, 4).float(), 1e-4, 0.1)
    _, exact = grpo_objective(model, ref, *args)
    _, flow_grpo = grpo_objective(model, ref, *args, kl_scale="flow_grpo")
    assert exact["grpo/kl"] > 1e-4
    assert exact["grpo/kl"] / flow_grpo["grpo/kl"] == pytest.approx(256.0, rel=1e-4)


def test_cps_rollouts_with_a_kl_give_a_finite_loss_and_gradient():
    """CPS's last step (t' = 1) has std 0: its KL is 0 by definition, so beta > 0 no longer yields NaN
    (issue: every CPS + KL run stopped on non-finite losses)."""
    w = RolloutWorker("tiny", SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4, sde_kind="cps"))
    batch = w.rollout([Prompt(prompt_id("a red circle"), "a red circle")], 2, record_chains=True)
    model = copy.deepcopy(w.bundle.model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.image_head.net.final_layer.linear.bias.add_(0.1)
    weights = trained_mask("full", 16, 4).float()
    loss, m = grpo_objective(model, ref, w.bundle.tokenizer, w.bundle.ids, batch, torch.tensor([1.0, -1.0]),
                             weights, 1e-4, 0.1)  # fmt: skip
    assert torch.isfinite(loss) and m["grpo/kl"] > 1e-4
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
