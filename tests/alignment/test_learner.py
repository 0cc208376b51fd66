"""The DeepSpeed learner at world size 1 on the CPU (ZeRO over gloo)."""

import copy
import math

import pytest
import torch

from alignment.learner import Learner, NonFiniteLossError
from alignment.learner_config import LearnerConfig, lr_lambda
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
    assert first.updated and last.updated
    first, last = first.metrics, last.metrics
    assert last["train/loss"] < first["train/loss"]
    assert set(first) >= {"train/loss", "train/grad_norm", "train/lr", "sft/flow_matching"}
    assert math.isfinite(first["train/grad_norm"]) and learner.step_count == 6
    weights = learner.policy_weights()
    assert weights["lm_head.weight"].dtype == torch.float32


def test_every_zero_stage_accumulates_all_micro_batches():
    # one step over 2 micro batches must use both gradients at every stage: before the learner told
    # DeepSpeed where the accumulation boundary is, ZeRO-1/2/3 kept only the last micro batch's gradient
    learner, data, loss_fn = _sft_setup(stage=0)
    reference = copy.deepcopy(learner.engine.module)
    for mb in data:
        (loss_fn(reference, mb)[0] / len(data)).backward()
    norm = float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]))
    )
    last_only = copy.deepcopy(learner.engine.module)
    (loss_fn(last_only, data[1])[0] / len(data)).backward()
    assert norm > 0 and abs(norm - float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in last_only.parameters() if p.grad is not None])))) > 0.05 * norm  # fmt: skip
    weights = {}
    for stage in (0, 1, 2, 3):
        learner, data, loss_fn = _sft_setup(stage)
        assert learner.step(data, loss_fn).metrics["train/grad_norm"] == pytest.approx(norm, rel=1e-5), f"stage {stage}"
        weights[stage] = learner.policy_weights()
    for stage in (1, 2, 3):
        assert all(torch.allclose(weights[0][k], weights[stage][k], atol=1e-6) for k in weights[0]), f"stage {stage}"


def test_nonfinite_losses_are_skipped_then_stop_the_job():
    learner, data, loss_fn = _sft_setup(stage=0)
    before = {k: v.clone() for k, v in learner.policy_weights().items()}

    def nan_loss(model, mb):
        loss, m = loss_fn(model, mb)
        return loss * float("nan"), m

    out = learner.step(data, nan_loss)
    assert not out.updated and out.metrics == {"train/skipped_nonfinite": 1.0} and learner.step_count == 0
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


def test_lora_step_trains_only_adapters_and_merges_into_plain_weights():
    """A LoRA DPO step moves adapter weights only; the reference (adapters off) is the starting model;
    policy_weights() has the plain keys with W + (alpha/r) B @ A and loads into a plain model."""
    from alignment.learner_config import LoraConfig
    from alignment.lora import lora_layers
    from alignment.losses import diffusion_dpo_loss
    from alignment.objectives import PairBatch, pair_scores

    bundle = build_random("tiny", seed=0)
    start = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["mlp.0", "final_layer.linear"])
    learner = Learner(bundle.model.train(), LearnerConfig(lr=1e-2, zero_stage=2, lora=lora))
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(
        prompts=["a cat", "a dog"], chosen=torch.randn(2, 16, 64, generator=g),
        rejected=torch.randn(2, 16, 64, generator=g), t=torch.rand(2, 16, generator=g),
        noise=torch.randn(2, 16, 64, generator=g),
    )  # fmt: skip

    def errors(model):
        scores = pair_scores(model, bundle.tokenizer, bundle.ids, batch, 64)
        return scores.err_w, scores.err_l

    def loss_fn(model, b):
        with learner.reference() as ref:
            ref_w, ref_l = errors(ref)
        out = diffusion_dpo_loss(*errors(model), ref_w, ref_l, beta=100.0)
        return out.loss, {}

    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    first = learner.step([batch], loss_fn).metrics
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at init: policy == reference
    learner.step([batch], loss_fn)
    changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed) and any(".lora_A." in n for n in changed)
    assert all(p.requires_grad == (".lora_" in n) for n, p in learner.model.named_parameters())

    plain_start = build_random("tiny", seed=0).model
    with learner.reference() as ref:
        assert torch.equal(errors(ref)[0], errors(plain_start)[0])

    merged = learner.policy_weights()
    assert set(merged) == set(start)
    layer = dict(lora_layers(learner.model))["image_head.net.final_layer.linear"]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    key = "image_head.net.final_layer.linear.weight"
    assert torch.allclose(merged[key], start[key] + 2.0 * b @ a, atol=1e-7)  # alpha / rank = 8 / 4
    assert torch.equal(merged["lm_head.weight"], start["lm_head.weight"])
    plain = build_random("tiny", seed=1).model
    plain.load_state_dict(merged, strict=True)
    learner.model.eval()
    assert torch.allclose(errors(plain)[0], errors(learner.model)[0], atol=1e-5)
    assert not torch.allclose(errors(plain)[0], errors(plain_start)[0], atol=1e-5)
