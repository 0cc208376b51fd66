"""DPO on Self-CoT pairs, on a tiny random model whose lm_head stops texts early: each image is scored after its
own reasoning in one pass over the pairs (whatever the batch), the reasoning log-probs equal what the sampler
recorded, and only the text term sends a gradient to lm_head."""

import copy
import dataclasses

import pytest
import torch

from alignment.losses import diffusion_dpo_loss
from alignment.objectives import make_batch, pair_scores
from base_model.generate import sample_prompts
from base_model.sampler import SamplingConfig
from base_model.sequence import build_prompt_batch, build_self_cot_batch
from base_model.teacher_forcing import per_image_flow_error, teacher_forced
from base_model.text import CotConfig
from rollout.prefs_format import PreferencePairs

# max_text_tokens 8: with these seeds the reasonings have 7, 8 (cut), 4 | 8 (cut), 1, 4 tokens
COT = SamplingConfig(image_size=64, cfg_scale=1.0, num_head_steps=4, self_cot=True,
                     cot=CotConfig(template="{caption}. plan:", max_text_tokens=8))  # fmt: skip
PROMPTS = ["a red circle", "two blue squares with a much longer caption", "x"]
SEEDS = [1, 2, 3, 4, 5, 6]  # winners 1..3, losers 4..6


@pytest.fixture(scope="module")
def drawn(chatty):
    """3 pairs of Self-CoT samples of the same prompts (samples 0..2 win against 3..5) and their SampleResult."""
    res = sample_prompts(chatty, PROMPTS * 2, SEEDS, COT)
    rows, text = res.text.rows(), res.text
    pairs = PreferencePairs(
        prompts=PROMPTS, chosen_tokens=res.tokens[:3], rejected_tokens=res.tokens[3:],
        chosen_reward=torch.ones(3), rejected_reward=torch.zeros(3), image_size=64,
        chosen_text_ids=rows[:3], rejected_text_ids=rows[3:],
        chosen_text_stopped=text.stopped[:3], rejected_text_stopped=text.stopped[3:], cot=COT.cot,
    )  # fmt: skip
    return pairs, res


def scores(bundle, batch, score_text=True):
    return pair_scores(bundle.model, bundle.tokenizer, bundle.ids, batch, 64, score_text=score_text)


def test_make_batch_carries_each_pairs_reasoning(drawn):
    pairs, _ = drawn
    batch = make_batch(pairs, [2, 0], [5, 6], seed=0, stream=0)
    assert batch.self_cot and batch.cot == COT.cot
    assert batch.chosen_text_ids == [pairs.chosen_text_ids[2], pairs.chosen_text_ids[0]]
    assert batch.rejected_text_ids == [pairs.rejected_text_ids[2], pairs.rejected_text_ids[0]]
    assert batch.rejected_text_stopped.tolist() == [True, False]  # the loser of pair 0 was cut at 8 tokens


def test_text_log_probs_of_the_pairs_equal_the_samplers(chatty, drawn):
    pairs, res = drawn
    assert not res.text.stopped.all() and len(set(res.text.lengths.tolist())) >= 3  # cut and stopped texts
    with torch.no_grad():
        out = scores(chatty, make_batch(pairs, [0, 1, 2], [0, 1, 2], seed=0, stream=0))
    recorded = res.text.log_probs.sum(-1)  # [6]: tokens and stop events as sampled
    torch.testing.assert_close(out.text_w, recorded[:3], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.text_l, recorded[3:], atol=1e-4, rtol=1e-5)


def test_one_pass_over_the_pairs_equals_one_teacher_forced_pass_per_row(chatty, drawn):
    """Batch independence: each of the 2N rows scored alone (its caption in the template, its own reasoning, its
    image) gives the batched pass's error and text log-prob; reasonings of different lengths pad the rows
    differently, never the scores."""
    pairs, res = drawn
    batch = make_batch(pairs, [0, 1, 2], [0, 1, 2], seed=0, stream=0)
    model, tok, ids = chatty.model, chatty.tokenizer, chatty.ids
    with torch.no_grad():
        together = scores(chatty, batch)
        no_text = scores(chatty, batch, score_text=False)
        err, text = [], []
        for i in range(6):  # winners 0..2, losers 3..5
            pb = build_self_cot_batch(tok, ids, [PROMPTS[i % 3]], (64, 64), False, COT.cot, texts=[res.text.rows()[i]])
            forced = teacher_forced(model, pb, ids, res.tokens[i : i + 1], text_stopped=res.text.stopped[i : i + 1])
            t, noise = batch.t[i % 3 : i % 3 + 1], batch.noise[i % 3 : i % 3 + 1]
            err.append(per_image_flow_error(model, forced.image_cond, res.tokens[i : i + 1], t, noise))
            text.append(forced.text_log_probs.sum(-1))
    err, text = torch.cat(err), torch.cat(text)  # [6]
    torch.testing.assert_close(torch.cat([together.err_w, together.err_l]), err, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([together.text_w, together.text_l]), text, atol=1e-5, rtol=1e-5)
    assert no_text.text_w is None and torch.equal(no_text.err_w, together.err_w)  # the same pass


def test_image_only_pairs_keep_todays_path(chatty, drawn):
    pairs, _ = drawn
    batch = make_batch(pairs, [0, 1, 2], [0, 1, 2], seed=0, stream=0)
    plain = dataclasses.replace(batch, chosen_text_ids=None, rejected_text_ids=None, chosen_text_stopped=None,
                                rejected_text_stopped=None, cot=None)  # fmt: skip
    model = chatty.model
    with torch.no_grad():
        image_only = pair_scores(model, chatty.tokenizer, chatty.ids, plain, 64)
        err_w, err_l = image_only.err_w, image_only.err_l
        # today's image-only computation, written out
        pb = build_prompt_batch(chatty.tokenizer, chatty.ids, PROMPTS * 2, (64, 64), False)
        tokens = torch.cat([plain.chosen, plain.rejected])
        cond = teacher_forced(model, pb, chatty.ids, tokens).image_cond
        today = per_image_flow_error(model, cond, tokens, plain.t.repeat(2, 1), plain.noise.repeat(2, 1, 1))
    assert torch.equal(torch.cat([err_w, err_l]), today)
    with pytest.raises(ValueError, match="Self-CoT"):
        scores(chatty, plain)


@pytest.mark.parametrize("text_loss", [False, True])
def test_a_gradient_reaches_lm_head_only_with_the_text_term(chatty, drawn, text_loss):
    pairs, _ = drawn
    batch = make_batch(pairs, [0, 1, 2], [0, 1, 2], seed=0, stream=0)
    policy = copy.deepcopy(chatty.model)
    with torch.no_grad():  # the reference: the untouched model
        ref = scores(chatty, batch, score_text=text_loss)
    pol = scores(dataclasses.replace(chatty, model=policy), batch, score_text=text_loss)
    out = diffusion_dpo_loss(pol.err_w, pol.err_l, ref.err_w, ref.err_l, 500.0, 0.0, pol.text_w, pol.text_l,
                             ref.text_w, ref.text_l, text_beta=0.1)  # fmt: skip
    assert float(out.loss.detach()) == pytest.approx(0.6931472, abs=1e-6)  # policy == reference: log 2
    out.loss.backward()
    lm_grad = policy.lm_head.weight.grad
    assert (lm_grad is not None and float(lm_grad.abs().sum()) > 0) == text_loss
    assert float(policy.image_head.net.input_proj.weight.grad.abs().sum()) > 0
    assert float(policy.layers[0].mlp.up_proj.weight.grad.abs().sum()) > 0  # the backbone, through h_j
