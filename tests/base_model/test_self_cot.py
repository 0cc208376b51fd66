"""Self-CoT text decoding: the text step's maths by hand, and text-then-image sampling that one teacher-forced
pass re-scores exactly (text and image log-probs), whatever the batch."""

import dataclasses
import math

import pytest
import torch

from base_model.checkpoint import build_random
from base_model.generate import decode_text, sample_prompts
from base_model.sampler import SamplingConfig
from base_model.sequence import build_self_cot_batch, cot_prompt_ids
from base_model.teacher_forcing import score_chains, teacher_forced
from base_model.text import CotConfig, text_log_prob, text_step
from core.errors import ConfigError

STOP = torch.tensor([3, 4])
NONE_BANNED = torch.tensor([], dtype=torch.long)


def test_text_step_draws_by_inverse_cdf_and_scores_under_the_model():
    # probabilities 0.1, 0.2, 0.3, 0.4 on tokens 0..3 (3 is a stop token, 4 has probability 0)
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])
    logits = torch.log(probs.clamp_min(1e-30))
    full = CotConfig()
    # sorted: 3 (0.4), 2 (0.3), 1 (0.2), 0 (0.1); cdf 0.4, 0.7, 0.9, 1.0
    for u, want in [(0.39, 3), (0.41, 2), (0.75, 1), (0.95, 0)]:
        token, logp, stop = text_step(logits, torch.tensor([u]), full, STOP, NONE_BANNED)
        assert int(token) == want
        expected = math.log(0.4) if want == 3 else math.log(probs[0, want])  # stop event: p(3) + p(4) = 0.4
        assert float(logp) == pytest.approx(expected, rel=1e-5)
        assert bool(stop) == (want == 3)
    # top_p 0.6 keeps 3 and 2 (0.4 before 2 is below 0.6; 0.7 before 1 is not): cdf 0.4, 0.7 of 0.7
    nucleus = CotConfig(top_p=0.6)
    assert int(text_step(logits, torch.tensor([0.5]), nucleus, STOP, NONE_BANNED)[0]) == 3  # 0.35 < 0.4
    token, logp, _ = text_step(logits, torch.tensor([0.6]), nucleus, STOP, NONE_BANNED)  # 0.42 > 0.4
    assert int(token) == 2 and float(logp) == pytest.approx(math.log(0.3), rel=1e-5)  # the model's p, not 0.3/0.7
    # greedy never draws a banned token
    greedy = CotConfig(temperature=0.0)
    assert int(text_step(logits, torch.tensor([0.5]), greedy, STOP, torch.tensor([3]))[0]) == 2
    # temperature 0.5 squares the odds: 0.16, 0.09, 0.04, 0.01 (sum 0.30); u = 0.6 -> 0.18 > 0.16 -> token 2
    assert int(text_step(logits, torch.tensor([0.6]), CotConfig(temperature=0.5), STOP, NONE_BANNED)[0]) == 2


def test_stop_event_scores_either_stop_token_the_same():
    log_pi = torch.log(torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.1]]))
    both = text_log_prob(log_pi.expand(2, -1), torch.tensor([3, 4]), STOP)
    torch.testing.assert_close(both, torch.full((2,), math.log(0.3)))


COT = SamplingConfig(image_size=64, cfg_scale=3.0, num_head_steps=4, self_cot=True,
                     cot=CotConfig(template="{caption}. plan:", max_text_tokens=12))  # fmt: skip
PROMPTS = ["a red circle", "two blue squares with a much longer caption", "x", "a green triangle", "y", "z"]
SEEDS = [1, 2, 3, 4, 5, 6]


def test_text_then_image_rescored_in_one_teacher_forced_pass_equals_sampling(chatty):
    res = sample_prompts(chatty, PROMPTS, SEEDS, COT, record_chains=True)
    text = res.text
    assert len(set(text.lengths.tolist())) >= 3 and bool(text.stopped.any())  # varied lengths: real gaps
    batch = build_self_cot_batch(chatty.tokenizer, chatty.ids, PROMPTS, (64, 64), True, COT.cot, texts=text.rows())
    forced = teacher_forced(chatty.model, batch, chatty.ids, res.tokens, text_stopped=text.stopped)
    width = forced.text_log_probs.shape[1]
    torch.testing.assert_close(forced.text_log_probs, text.log_probs[:, :width], atol=1e-5, rtol=1e-5)
    assert text.log_probs[:, width:].abs().sum() == 0
    assert (text.log_probs.sum(-1) < 0).all()
    chains = score_chains(chatty.model, batch, chatty.ids, res.tokens, res.chains, COT)
    torch.testing.assert_close(chains.log_probs, res.log_probs, atol=1e-4, rtol=1e-4)


def test_a_sample_is_the_same_alone_or_in_a_batch_and_seeded(chatty):
    batched = sample_prompts(chatty, PROMPTS, SEEDS, COT)
    for i in (1, 4):
        alone = sample_prompts(chatty, [PROMPTS[i]], [SEEDS[i]], COT)
        assert alone.text.rows()[0] == batched.text.rows()[i]
        torch.testing.assert_close(alone.tokens[0], batched.tokens[i], atol=1e-4, rtol=1e-4)
    again = sample_prompts(chatty, PROMPTS, SEEDS, COT)
    assert torch.equal(again.text.ids, batched.text.ids) and torch.equal(again.tokens, batched.tokens)
    other = sample_prompts(chatty, PROMPTS, [s + 100 for s in SEEDS], COT)
    assert other.text.rows() != batched.text.rows()


def test_a_text_cut_at_max_tokens_scores_no_stop_and_greedy_is_deterministic():
    plain = build_random("tiny", seed=0)  # no stop bias: greedy writes until the cut
    quiet = dataclasses.replace(COT, cot=CotConfig(template="{caption}:", max_text_tokens=3, temperature=0.0))
    res = sample_prompts(plain, PROMPTS[:3], SEEDS[:3], quiet, record_chains=True)
    assert torch.equal(res.text.lengths, torch.full((3,), 3)) and not res.text.stopped.any()
    assert (res.text.log_probs[:, 3] == 0).all() and (res.text.log_probs[:, :3] < 0).all()
    other_seeds = sample_prompts(plain, PROMPTS[:3], [s + 7 for s in SEEDS[:3]], quiet)
    assert torch.equal(other_seeds.text.ids, res.text.ids)  # greedy ignores the draws
    assert len(decode_text(plain, res.text)) == 3
    batch = build_self_cot_batch(plain.tokenizer, plain.ids, PROMPTS[:3], (64, 64), True, quiet.cot,
                                 texts=res.text.rows())  # fmt: skip
    forced = teacher_forced(plain.model, batch, plain.ids, res.tokens, text_stopped=res.text.stopped)
    torch.testing.assert_close(forced.text_log_probs, res.text.log_probs, atol=1e-5, rtol=1e-5)


def test_template_wraps_the_truncated_caption():
    bundle = build_random("tiny", seed=0)
    ids = cot_prompt_ids(bundle.tokenizer, ["abcdef"], CotConfig(template="<{caption}>"), max_prompt_tokens=3)
    assert bundle.tokenizer.decode(ids[0]) == "<abc>"


@pytest.mark.parametrize("field,value", [("template", "no caption field"), ("max_text_tokens", 0),
                                         ("temperature", -1.0), ("top_p", 0.0)])  # fmt: skip
def test_cot_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(COT, cot=dataclasses.replace(CotConfig(), **{field: value})).validate()
