"""The committed Self-CoT shapes model (shapes/assets/pretrained_cot, `nsalign sft configs/shapes/cot.yaml`):
it writes a plan for held-out captions, and text-then-image sampling is exact on it (one teacher-forced pass
re-scores the sampler's text and image log-probs)."""

from pathlib import Path

import pytest
import torch

from base_model.checkpoint import load_checkpoint
from base_model.generate import decode_text, sample_prompts
from base_model.sampler import SamplingConfig
from base_model.sequence import build_self_cot_batch
from base_model.teacher_forcing import score_chains, teacher_forced
from base_model.text import CotConfig
from core.schema import load_config
from jobs.sft import SftConfig
from shapes.scenes import parse_plan, plan_agrees
from shapes.splits import prompt_split
from shapes.world import WorldConfig

ASSET = Path(__file__).resolve().parents[2] / "shapes" / "assets" / "pretrained_cot"
pytestmark = pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="no committed pretrained_cot asset")


@pytest.fixture(scope="module")
def bundle():
    return load_checkpoint(ASSET)


@pytest.fixture(scope="module")
def held_out():
    """The world's first 8 eval prompts (captions the Self-CoT SFT never saw) with their specs."""
    world = load_config(WorldConfig, "configs/shapes_world/world.yaml")
    return prompt_split(world.data, "eval")[:8]


def sampling(temperature: float, head_steps: int = 25) -> SamplingConfig:
    """The e2e's Self-CoT sampling: the training template of configs/shapes/cot.yaml, cfg 3.0."""
    trained = load_config(SftConfig, "configs/shapes/cot.yaml", ["data.path=unused.parquet"])
    cot = CotConfig(template=trained.cot.template, max_text_tokens=trained.cot.max_text_tokens, temperature=temperature)
    return SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=head_steps, self_cot=True, cot=cot)


def test_template_is_the_documented_one():
    assert sampling(1.0).cot.template == "{caption}. plan: "


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_self_cot_sampling_writes_plans_that_fit_the_caption(bundle, held_out, temperature):
    captions = [e.caption for e in held_out]
    res = sample_prompts(bundle, captions, list(range(len(captions))), sampling(temperature, head_steps=2))
    plans = decode_text(bundle, res.text)
    assert bool(res.text.stopped.all())  # every plan ended with its stop token, not at the length cap
    assert sum(parse_plan(p) is not None for p in plans) >= 7, plans
    assert sum(plan_agrees(p, e.spec) for p, e in zip(plans, held_out)) >= 6, plans


def test_text_then_image_is_rescored_exactly_in_one_teacher_forced_pass(bundle, held_out):
    captions = [e.caption for e in held_out[:6]]
    config = sampling(1.0, head_steps=4)
    res = sample_prompts(bundle, captions, [11, 12, 13, 14, 15, 16], config, record_chains=True)
    text = res.text
    assert len(set(text.lengths.tolist())) >= 2  # plans of several lengths: real padding gaps
    batch = build_self_cot_batch(bundle.tokenizer, bundle.ids, captions, (64, 64), True, config.cot,
                                 texts=text.rows())  # fmt: skip
    with torch.no_grad():
        forced = teacher_forced(bundle.model, batch, bundle.ids, res.tokens, text_stopped=text.stopped)
        chains = score_chains(bundle.model, batch, bundle.ids, res.tokens, res.chains, config)
    width = forced.text_log_probs.shape[1]
    torch.testing.assert_close(forced.text_log_probs, text.log_probs[:, :width], atol=1e-4, rtol=1e-4)
    assert (text.log_probs.sum(-1) < 0).all()
    torch.testing.assert_close(chains.log_probs, res.log_probs, atol=1e-4, rtol=1e-4)
