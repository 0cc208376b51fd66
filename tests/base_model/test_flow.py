"""The sampler maths against hand-computed values."""

import math

import pytest
import torch

from base_model.flow import (
    combine_guidance,
    counter_noise,
    flow_grpo_kl_factor,
    flow_matching_inputs,
    gaussian_kl_same_std,
    head_step,
    time_grid,
)


def test_time_grid_plain_and_shifted():
    assert time_grid(4).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # shift 3: t/(3-2t) at t = 0, .25, .5, .75 -> 0, 0.1, 0.25, 0.5; then 1.0
    assert time_grid(4, shift=3.0).tolist() == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0])


def test_combine_guidance_scale_one_is_cond_and_formula():
    vc, vu = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(combine_guidance(vc, vu, 1.0), vc)
    assert combine_guidance(vc, vu, 3.0).tolist() == pytest.approx([0.5 + 3 * 0.5, -1.0 + 3 * 3.0])


def test_sde_step_mean_std_and_logprob_are_the_analytic_gaussian():
    # D = 2, x = (1, -1), v = (2, 0), t = 0.5, t' = 0.75 -> dt = .25
    x, v = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]])
    noise = torch.tensor([[1.0, -2.0]])
    out = head_step(x, v, 0.5, 0.75, "sde", noise=noise)
    # drift = (1+t) v - x = (3 - 1, 0 + 1) = (2, 1); mean = x + drift dt = (1.5, -0.75)
    assert out.mean[0].tolist() == pytest.approx([1.5, -0.75])
    var = 2 * (1 - 0.5) * 0.25  # 0.25 -> std 0.5
    assert float(out.std) == pytest.approx(0.5)
    assert out.x_next[0].tolist() == pytest.approx([1.5 + 0.5, -0.75 - 1.0])
    # log N(x'; mean, var I) summed over 2 dims with |x'-mean|^2 = var * (1 + 4)
    expected = -(1 + 4) / 2 - 2 * 0.5 * math.log(2 * math.pi * var)
    assert float(out.log_prob) == pytest.approx(expected, abs=1e-5)
    ref = torch.distributions.Normal(out.mean, 0.5).log_prob(out.x_next).sum()
    assert float(out.log_prob) == pytest.approx(float(ref), abs=1e-5)
    mean_red = head_step(x, v, 0.5, 0.75, "sde", noise=noise, reduction="mean")
    assert float(mean_red.log_prob) == pytest.approx(expected / 2, abs=1e-5)


def test_scoring_a_sampled_step_gives_the_same_logprob():
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(5, 64, generator=g) for _ in range(3))
    t, tn = torch.full((5,), 0.3), torch.full((5,), 0.4)
    for kind in ("sde", "cps", "ode"):
        s = head_step(x, v, t, tn, kind, noise=eps)
        r = head_step(x, v, t, tn, kind, x_next=s.x_next)
        torch.testing.assert_close(r.log_prob, s.log_prob)
    with pytest.raises(ValueError):
        head_step(x, v, t, tn, "sde")


def test_cps_step_is_coefficient_preserving():
    # x = t*x1 + (1-t)*e exactly, v = x1 - e: d = x1, n = e
    x1, e = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    t, tn = 0.25, 0.5
    x = t * x1 + (1 - t) * e
    out = head_step(x, x1 - e, t, tn, "cps", noise=torch.zeros(1, 1), cps_noise_level=1.0)
    # a = 1 -> s = (1 - 0.5) * 1 = 0.5 = 1 - t': all noise variance comes fresh, mean = t' * x1
    assert float(out.mean) == pytest.approx(0.5 * 2.0)
    assert float(out.std) == pytest.approx(0.5)
    x_late = 0.75 * x1 + 0.25 * e
    last = head_step(x_late, x1 - e, 0.75, 1.0, "cps", noise=torch.ones(1, 1))
    assert float(last.x_next) == pytest.approx(2.0)  # t' = 1: deterministic, lands on x1


def test_gaussian_kl_same_std():
    kl = gaussian_kl_same_std(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor(0.5))
    assert float(kl) == pytest.approx((1 + 4) / (2 * 0.25))


def test_gaussian_kl_per_step_std_and_zero_std_steps():
    """Three steps, |mu_p - mu_q|^2 = 1 + 4 = 5 each, stds (0.5, 2, 0): 5 / (2 * 0.25) = 10, 5 / (2 * 4) = 0.625,
    and 0 at the deterministic step (CPS at t' = 1) -- finite, and so is its gradient."""
    mean_p = torch.tensor([[1.0, 2.0]] * 3, requires_grad=True)  # [K, D]
    kl = gaussian_kl_same_std(mean_p, torch.zeros(3, 2), torch.tensor([0.5, 2.0, 0.0]))
    assert kl.tolist() == pytest.approx([10.0, 0.625, 0.0])
    kl.sum().backward()
    assert torch.isfinite(mean_p.grad).all() and mean_p.grad[2].tolist() == [0.0, 0.0]
    # the CPS std really is 0 at the last step
    last = head_step(torch.zeros(1, 2), torch.ones(1, 2), 0.75, 1.0, "cps", noise=torch.ones(1, 2))
    assert float(last.std) == 0.0


def test_flow_grpo_kl_factor_is_dt_over_d_for_sde_and_one_over_d_for_cps():
    """K = 10 uniform steps, D = 64: flow_grpo averages over the dims (1/64) and leaves dt = 0.1 out of the
    sde variance (x 0.1), so our exact KL is 64 / 0.1 = 640x flow_grpo's; its CPS std has no dt: 64x."""
    grid = time_grid(10)
    sde = flow_grpo_kl_factor("sde", grid[:-1], grid[1:], 64)
    assert (1 / sde).tolist() == pytest.approx([640.0] * 10, rel=1e-5)
    assert (1 / flow_grpo_kl_factor("cps", grid[:-1], grid[1:], 64)).tolist() == pytest.approx([64.0] * 10)
    # on one sde step (t = 0.5 -> 0.6): exact KL = |d|^2 / (2 * 2 (1-t) dt); flow_grpo's = mean_d d^2 / (2 * 2 (1-t))
    d = torch.full((1, 64), 0.3)
    step = head_step(torch.zeros(1, 64), torch.zeros(1, 64), 0.5, 0.6, "sde", noise=torch.zeros(1, 64))
    exact = gaussian_kl_same_std(d, torch.zeros(1, 64), step.std)
    flow_grpo = (0.3**2) / (2 * 2 * (1 - 0.5))
    assert float(exact * flow_grpo_kl_factor("sde", torch.tensor([0.5]), torch.tensor([0.6]), 64)) == pytest.approx(
        flow_grpo, rel=1e-5
    )


def test_cps_step_by_hand_with_partial_noise():
    """x1 = 2, e = -1, t = 0.25 -> t' = 0.5, a = 1/3: x = 0.25 * 2 + 0.75 * (-1) = -0.25, v = x1 - e = 3,
    d = x + 0.75 v = 2, n = x - 0.25 v = -1; s = (1 - 0.5) sin(pi / 6) = 0.25;
    mean = t' d + sqrt(0.5^2 - 0.25^2) n = 1 - sqrt(0.1875) = 0.5669873; eps = (2, -2) -> x' = mean +- 0.5.
    log pi = -sum (x' - mean)^2 = -(0.25 + 0.25) = -0.5 (sum), -0.25 (mean); scoring x' gives the same."""
    x, v = torch.full((1, 2), -0.25), torch.full((1, 2), 3.0)
    out = head_step(x, v, 0.25, 0.5, "cps", noise=torch.tensor([[2.0, -2.0]]), cps_noise_level=1 / 3)
    mean = 1.0 - math.sqrt(0.1875)
    assert out.mean[0].tolist() == pytest.approx([mean, mean])
    assert float(out.std) == pytest.approx(0.25)
    assert out.x_next[0].tolist() == pytest.approx([mean + 0.5, mean - 0.5])
    assert float(out.log_prob) == pytest.approx(-0.5, rel=1e-5)
    scored = head_step(x, v, 0.25, 0.5, "cps", x_next=torch.tensor([[mean + 0.5, mean - 0.5]]), cps_noise_level=1 / 3,
                       reduction="mean")  # fmt: skip
    assert float(scored.log_prob) == pytest.approx(-0.25, rel=1e-5)


def test_counter_noise_is_per_sample_deterministic_and_standard_normal():
    seeds = torch.tensor([3, 7, 11])
    a = counter_noise(seeds, 5, 2, 64)
    assert torch.equal(a[1:2], counter_noise(seeds[1:2], 5, 2, 64))  # independent of batch mates
    assert not torch.equal(a, counter_noise(seeds, 5, 3, 64))
    assert not torch.equal(a, counter_noise(seeds, 6, 2, 64))
    big = counter_noise(torch.arange(20000), 0, 0, 64)
    assert abs(float(big.mean())) < 0.01
    assert abs(float(big.std()) - 1.0) < 0.01
    corr = torch.corrcoef(torch.stack([big[:, 0], big[:, 1]]))[0, 1]
    assert abs(float(corr)) < 0.03


def test_flow_matching_inputs():
    x1, e = torch.tensor([[4.0]]), torch.tensor([[2.0]])
    xt, v = flow_matching_inputs(x1, torch.tensor([0.25]), e)
    assert xt.tolist() == [[0.25 * 4 + 0.75 * 2]]
    assert v.tolist() == [[2.0]]
