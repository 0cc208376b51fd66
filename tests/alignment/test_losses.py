"""Losses against hand computations."""

import math

import pytest
import torch

from alignment.losses import (
    diffusion_dpo_loss,
    group_advantages,
    grpo_loss,
    keep_groups,
    prefix_phase,
    soft_value,
    step_weights,
    trained_mask,
)


def test_dpo_is_log2_when_policy_equals_reference():
    e = torch.tensor([0.3, 1.2, 0.7])
    out = diffusion_dpo_loss(e, e.flip(0), e, e.flip(0), beta=500.0)
    assert float(out.loss) == pytest.approx(math.log(2))
    assert float(out.implicit_accuracy) == 0.0 and float(out.margin) == 0.0


def test_dpo_chosen_fm_term_adds_lambda_times_the_winners_error():
    e = torch.tensor([0.3, 1.2, 0.7])  # winners' mean error 0.7333...
    out = diffusion_dpo_loss(e, e.flip(0), e, e.flip(0), beta=500.0, chosen_fm_weight=0.5)
    assert float(out.loss) == pytest.approx(math.log(2) + 0.5 * (0.3 + 1.2 + 0.7) / 3)
    assert float(out.margin) == 0.0  # the margin (and accuracy) measure DPO alone


def test_dpo_hand_values():
    # policy improves the winner by 0.002 and worsens the loser by 0.002; beta 1000:
    # inside = -(1000/2) * (-0.002 - 0.002) = 2 -> loss = -log sigmoid(2)
    f64 = dict(dtype=torch.float64)  # exact inputs: 0.998 is not representable in fp32
    out = diffusion_dpo_loss(
        torch.tensor([0.998], **f64), torch.tensor([1.002], **f64), torch.tensor([1.0], **f64),
        torch.tensor([1.0], **f64), beta=1000.0,
    )  # fmt: skip
    assert float(out.loss) == pytest.approx(-math.log(1 / (1 + math.exp(-2))), rel=1e-5)
    assert float(out.implicit_accuracy) == 1.0 and float(out.margin) == pytest.approx(2.0, rel=1e-4)
    assert float(out.mse_w) == pytest.approx(0.998) and float(out.ref_mse_l) == pytest.approx(1.0)


def test_dpo_text_term_adds_the_reasoning_margin_inside_the_sigmoid():
    # 2 Self-CoT pairs, beta 1000, text_beta 0.1, lambda 0.5:
    # pair 0: image errors -0.002 / +0.002 vs the reference -> z_img = 2; text log-ratios 3 / -2 -> m_text = 0.5
    # pair 1: image errors +0.004 / 0 -> z_img = -2; text log-ratios 1 / -1 -> m_text = 0.2
    # z = (2.5, -1.8): loss = mean(softplus(-2.5), softplus(1.8)) + 0.5 * mean(0.998, 1.004)
    f64 = dict(dtype=torch.float64)
    err_w, err_l = torch.tensor([0.998, 1.004], **f64), torch.tensor([1.002, 1.0], **f64)
    ref = torch.ones(2, **f64)
    text = {name: torch.tensor(v, **f64) for name, v in [("text_w", [-10.0, -20.0]), ("text_l", [-15.0, -30.0]),
            ("ref_text_w", [-13.0, -21.0]), ("ref_text_l", [-13.0, -29.0])]}  # fmt: skip
    out = diffusion_dpo_loss(err_w, err_l, ref, ref, beta=1000.0, chosen_fm_weight=0.5, text_beta=0.1, **text)

    def softplus(x: float) -> float:  # -log sigmoid(z) = softplus(-z)
        return math.log1p(math.exp(x))

    expected = (softplus(-2.5) + softplus(1.8)) / 2 + 0.5 * (0.998 + 1.004) / 2
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    assert float(out.margin) == pytest.approx(0.35, abs=1e-6) and float(out.implicit_accuracy) == 0.5
    assert float(out.image_margin) == pytest.approx(0.0, abs=1e-6) and float(out.text_margin) == pytest.approx(0.35)
    assert float(out.text_logratio_chosen) == pytest.approx(2.0) and float(out.text_logratio_rejected) == -1.5
    # without the text term the same images give z = (2, -2): the text fields are absent
    plain = diffusion_dpo_loss(err_w, err_l, ref, ref, beta=1000.0)
    assert float(plain.loss) == pytest.approx((softplus(-2.0) + softplus(2.0)) / 2, abs=1e-6)
    assert plain.text_margin is None and plain.image_margin is None
    with pytest.raises(ValueError, match="together"):
        diffusion_dpo_loss(err_w, err_l, ref, ref, beta=1000.0, text_w=text["text_w"], text_l=text["text_l"])


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    adv = group_advantages(r, eps=0.0 + 1e-4)
    # group 0: mean 2, std 1 -> (-1, 1)/(1 + 1e-4); group 1: std 0 -> 0
    assert adv[0].tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001])
    assert adv[1].tolist() == [0.0, 0.0]
    assert group_advantages(torch.tensor([[0.0, 0.0, 0.0, 100.0]]), clip=1.5).max() == 1.5


def test_batch_scaled_advantages_keep_small_groups_small():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.1]])
    # centred (-0.5, 0.5), (-0.05, 0.05); one std sqrt((0.25 + 0.25 + 0.0025 + 0.0025) / 4) = 0.355317
    adv = group_advantages(r, eps=0.0, scale="batch")
    assert adv.flatten().tolist() == pytest.approx([-1.407195, 1.407195, -0.1407195, 0.1407195], rel=1e-5)
    group = [-0.5 / 0.5001, 0.5 / 0.5001, -0.05 / 0.0501, 0.05 / 0.0501]  # each group to unit scale
    assert group_advantages(r, eps=1e-4, scale="group").flatten().tolist() == pytest.approx(group, rel=1e-5)
    assert group_advantages(r, scale="none").flatten().tolist() == pytest.approx([-0.5, 0.5, -0.05, 0.05])


def test_keep_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.9, 1.0]])
    assert keep_groups(r, min_std=0.01, max_mean=None).tolist() == [False, True, True]
    assert keep_groups(r, min_std=0.01, max_mean=0.9).tolist() == [False, True, False]


def test_grpo_on_policy_loss_is_minus_mean_weighted_advantage_and_clip():
    lp = torch.zeros(2, 3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    out = grpo_loss(lp, lp.detach(), adv, torch.full((3, 4), 0.25), clip_eps=0.2)  # 1 / n_t, n_t = 4 (alpha 1)
    assert float(out.loss) == pytest.approx(-(1.0 - 2.0) / 2)  # ratio 1: -mean(A)
    assert float(out.clip_frac) == 0.0 and float(out.approx_kl) == pytest.approx(0.0)
    # ratio e^0.5 > 1.2 with A > 0 is clipped: surrogate = 1.2 * A
    lp2 = torch.full((1, 1, 1), 0.5)
    out2 = grpo_loss(lp2, torch.zeros(1, 1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert float(out2.loss) == pytest.approx(-1.2) and float(out2.clip_frac) == 1.0


def test_grpo_gradient_is_zero_when_all_advantages_are_zero():
    lp = torch.randn(2, 3, 4, requires_grad=True)
    out = grpo_loss(lp, lp.detach() + 0.01, torch.zeros(2), torch.ones(3, 4), clip_eps=1e-4)
    out.loss.backward()
    assert torch.count_nonzero(lp.grad) == 0


def test_grpo_weights_and_kl():
    lp = torch.zeros(1, 2, 2)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # only cell (0, 0) trained
    kl = torch.tensor([[[0.5, 9.0], [9.0, 9.0]]])
    out = grpo_loss(lp, lp, torch.tensor([2.0]), w, clip_eps=0.1, kl=kl, beta=0.1)
    assert float(out.loss) == pytest.approx(-2.0 + 0.1 * 0.5)


def test_trained_masks():
    assert trained_mask("full", 3, 2).all()
    tp = trained_mask("token_prefix", 3, 2, prefix=1)
    assert tp.tolist() == [[True, True], [False, False], [False, False]]
    sp = trained_mask("step_prefix", 2, 3, prefix=2)
    assert sp.tolist() == [[True, True, False], [True, True, False]]
    sw = trained_mask("step_window", 1, 5, window_start=1, window=2)
    assert sw.tolist() == [[False, True, True, False, False]]


def test_step_weights_one_over_n_to_the_alpha():
    mask = trained_mask("step_prefix", 2, 4, prefix=2)
    w = step_weights(mask, alpha=0.5)
    assert w[0].tolist() == pytest.approx([2**-0.5, 2**-0.5, 0.0, 0.0])


def test_prefix_suffix_alternation_and_soft_value():
    assert [prefix_phase(i) for i in range(5)] == ["prefix", "prefix", "prefix", "suffix", "prefix"]
    # V = log mean exp(R): R = (0, log 3) -> log((1 + 3) / 2) = log 2
    assert float(soft_value(torch.tensor([0.0, math.log(3.0)]))) == pytest.approx(math.log(2.0))


def test_grpo_loss_changes_with_alpha_by_hand():
    """step_prefix 2 of K = 4 head steps, T = 2 tokens, ratio 1, A = 1: each token has n_t = 2 trained
    cells of weight 2^-alpha, so a token's loss is -2 * 2^-alpha and the loss (mean over the 2 tokens) is
    -2^(1 - alpha): alpha 1 -> -1 (the mean over cells), 0.5 -> -sqrt 2 = -1.414214, 0 -> -2 (the sum)."""
    mask = trained_mask("step_prefix", 2, 4, prefix=2)
    lp = torch.zeros(1, 2, 4)
    losses = {}
    for alpha in (1.0, 0.5, 0.0):
        w = step_weights(mask, alpha)
        torch.testing.assert_close(w, torch.tensor([[2**-alpha, 2**-alpha, 0.0, 0.0]] * 2))
        losses[alpha] = float(grpo_loss(lp, lp, torch.tensor([1.0]), w, clip_eps=0.1).loss)
    assert losses == pytest.approx({1.0: -1.0, 0.5: -math.sqrt(2), 0.0: -2.0})


def test_grpo_untrained_cells_cannot_poison_the_loss():
    """A non-finite KL or log-prob in an untrained cell (weight 0) leaves the loss finite: trained cell
    (0, 0) only, ratio 1, A = 2, KL 0.5, beta 0.1 -> -2 + 0.05."""
    lp = torch.tensor([[[0.0, float("nan")], [0.0, 0.0]]])
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    kl = torch.tensor([[[0.5, float("inf")], [float("nan"), 9.0]]])
    out = grpo_loss(lp, torch.zeros(1, 2, 2), torch.tensor([2.0]), w, clip_eps=0.1, kl=kl, beta=0.1)
    assert float(out.loss) == pytest.approx(-2.0 + 0.1 * 0.5)
    assert float(out.kl) == pytest.approx(0.5) and float(out.approx_kl) == 0.0


def test_grpo_lower_clip_side_and_approx_kl_sign_by_hand():
    """A = -1, log-ratio log 0.5 (ratio 0.5), eps 0.2: min(0.5 * -1, clip(0.5, 0.8, 1.2) * -1) = min(-0.5, -0.8)
    = -0.8 -> loss 0.8 (the lower clip bound binds). k3 = (rho - 1) - log rho = -0.5 + log 2 = 0.193147 >= 0;
    for log-ratio +0.5: e^0.5 - 1 - 0.5 = 0.148721."""
    half = torch.full((1, 1, 1), math.log(0.5))
    out = grpo_loss(half, torch.zeros(1, 1, 1), torch.tensor([-1.0]), torch.ones(1, 1), clip_eps=0.2)
    assert float(out.loss) == pytest.approx(0.8)
    assert float(out.clip_frac) == 1.0
    assert float(out.approx_kl) == pytest.approx(-0.5 + math.log(2), rel=1e-5)
    up = grpo_loss(torch.full((1, 1, 1), 0.5), torch.zeros(1, 1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2)
    assert float(up.approx_kl) == pytest.approx(math.exp(0.5) - 1.5, rel=1e-5)


def test_global_std_advantages_are_flow_grpos():
    """rewards [[0, 1], [10, 11]]: flow_grpo's global std is the std of all four raw rewards,
    sqrt((5.5^2 + 4.5^2 + 4.5^2 + 5.5^2) / 4) = sqrt(25.25) = 5.024938 -> +-0.5 / (5.024938 + 1e-4) = +-0.0995017;
    'batch' divides by the RMS of the centred rewards (0.5): +-0.5 / 0.5001 = +-0.9998."""
    r = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
    fg = 0.5 / (math.sqrt(25.25) + 1e-4)
    assert group_advantages(r, scale="global_std").flatten().tolist() == pytest.approx([-fg, fg, -fg, fg], rel=1e-6)
    rms = 0.5 / 0.5001
    assert group_advantages(r, scale="batch").flatten().tolist() == pytest.approx([-rms, rms, -rms, rms], rel=1e-6)
    with pytest.raises(ValueError, match="global_std"):
        group_advantages(r, scale="global")


class _ZeroVelocity:
    """A head that predicts v = 0 everywhere, so the flow-matching error is ||y - e||^2 / D."""

    def velocity(self, x, t, cond):
        return torch.zeros_like(x)


def test_dpo_per_image_error_is_the_mean_over_tokens_and_dims():
    """Two tokens of D = 2, e = 0, v = 0: token errors mean((1, 1)^2) = 1 and mean((3, 1)^2) = (9 + 1) / 2 = 5;
    Diffusion-DPO's l(y) is their mean over tokens, 3 (a sum over tokens would give 6, over dims 12)."""
    from base_model.teacher_forcing import per_image_flow_error

    tokens = torch.tensor([[[1.0, 1.0], [3.0, 1.0]]])  # [N=1, T=2, D=2]
    err = per_image_flow_error(_ZeroVelocity(), torch.zeros(1, 2, 4), tokens, torch.full((1, 2), 0.5),
                               torch.zeros(1, 2, 2))  # fmt: skip
    assert err.tolist() == pytest.approx([3.0])
