"""The DeepSpeed learner at world size 1 on the CPU (ZeRO over gloo)."""

import math

import pytest
import torch

from alignment.learner import Learner, LearnerConfig, NonFiniteLossError, lr_lambda
from base_model.checkpoint import build_random
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import sft_loss

pytestmark = pytest.mark.deepspeed


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(LearnerConfig(warmup_steps=2, lr_schedule="cosine", total_steps=6))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(4) == pytest.approx(0.5) and f(6) == pytest.approx(0.0)


def _sft_setup(stage: int):
    bundle = build_random("tiny", seed=0)
    learner = Learner(bundle.model.train(), LearnerConfig(lr=1e-3, zero_stage=stage))
    g = torch.Generator().manual_seed(0)
    data = [(build_prompt_batch(bundle.tokenizer, bundle.ids, [f"caption {i}"], (64, 64), False),
             torch.randn(1, 16, 64, generator=g)) for i in range(2)]  # fmt: skip

    def loss_fn(model, mb):
        out = sft_loss(model, mb[0], bundle.ids, mb[1], generator=torch.Generator().manual_seed(1))
        return out.loss, {"sft/text_ce": float(out.text_ce), "sft/flow_matching": float(out.flow_matching)}

    return learner, data, loss_fn


def test_sft_steps_reduce_the_loss_and_report_health_metrics():
    learner, data, loss_fn = _sft_setup(stage=2)
    first = learner.step(data, loss_fn)
    for _ in range(5):
        last = learner.step(data, loss_fn)
    assert last["train/loss"] < first["train/loss"]
    assert set(first) >= {"train/loss", "train/grad_norm", "train/lr", "sft/flow_matching"}
    assert math.isfinite(first["train/grad_norm"]) and learner.step_count == 6
    weights = learner.policy_weights()
    assert weights["lm_head.weight"].dtype == torch.float32


def test_nonfinite_losses_are_skipped_then_stop_the_job():
    learner, data, loss_fn = _sft_setup(stage=0)
    before = {k: v.clone() for k, v in learner.policy_weights().items()}

    def nan_loss(model, mb):
        loss, m = loss_fn(model, mb)
        return loss * float("nan"), m

    out = learner.step(data, nan_loss)
    assert out["train/skipped_nonfinite"] == 1.0 and learner.step_count == 0
    after = learner.policy_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    learner.step(data, nan_loss)
    with pytest.raises(NonFiniteLossError):
        learner.step(data, nan_loss)


def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, save, a fresh learner loads, 2 more steps (same weights on CPU)."""
    straight, data, loss_fn = _sft_setup(stage=2)
    for _ in range(4):
        straight.step(data, loss_fn)
    first, data, loss_fn = _sft_setup(stage=2)
    for _ in range(2):
        first.step(data, loss_fn)
    first.save_state(tmp_path)
    resumed, data, loss_fn = _sft_setup(stage=2)
    resumed.load_state(tmp_path)
    assert resumed.step_count == 2
    for _ in range(2):
        resumed.step(data, loss_fn)
    a, b = straight.policy_weights(), resumed.policy_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
