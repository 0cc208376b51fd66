"""dashboard.stats on hand-made score tables (values derivable on paper)."""

import numpy as np
import pytest

from dashboard.stats import (
    mean_ci,
    mean_pairwise_distance,
    paired_delta_ci,
    per_prompt_delta_ci,
    ranks,
    spearman,
    win_rate,
    win_rate_matrix,
    within_prompt_diversity,
)


def test_win_rate_counts_ties_as_half():
    # rows: 1>0 win, 2=2 tie, 3<4 loss -> (1 + 0.5 + 0) / 3
    assert win_rate(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0])) == pytest.approx(0.5)
    assert win_rate(np.array([3.0, 3.0]), np.array([1.0, 1.0])) == 1.0


def test_win_rate_matrix_is_complementary():
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0], [9.0, 9.0, 9.0, 9.0]])  # [C=3, N=4]
    w = win_rate_matrix(scores)
    # ckpt 0 vs 1: win, tie, loss, win -> 2.5 / 4; ckpt 2 beats both everywhere
    assert w[0, 1] == pytest.approx(0.625) and w[1, 0] == pytest.approx(0.375)
    assert w[2, 0] == w[2, 1] == 1.0
    np.testing.assert_allclose(np.diag(w), 0.5)
    np.testing.assert_allclose(w + w.T, 1.0)


def test_paired_delta_of_a_constant_shift_has_a_zero_width_interval():
    b = np.array([0.0, 10.0, 20.0, 30.0])  # huge spread between rows ...
    a = b + 0.25  # ... but every row gains exactly 0.25
    assert paired_delta_ci(a, b) == pytest.approx((0.25, 0.25, 0.25))
    _, lo, hi = mean_ci(a)  # unpaired, the same gain would be lost in the row spread
    assert hi - lo > 10


def test_bootstrap_of_two_points():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1
    assert mean_ci(np.array([0.0, 1.0]), num_resamples=2000) == pytest.approx((0.5, 0.0, 1.0))


def test_bootstrap_width_matches_the_normal_approximation():
    x = np.random.default_rng(1).normal(size=400)
    m, lo, hi = mean_ci(x, num_resamples=2000, seed=3)
    assert lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)  # 2 * 1.96 * sigma / sqrt(400)
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)  # seeded: reproducible


def test_per_prompt_interval_resamples_prompts_not_rows():
    # prompt p gains 0 on all 10 seeds, prompt q gains 1 on all 10: per-prompt gains [0, 1] -> as two
    # points, interval [0, 1]; row-wise, 20 "independent" rows would give a much narrower interval
    a, b = np.array([0.0] * 10 + [1.0] * 10), np.zeros(20)
    ids = ["p"] * 10 + ["q"] * 10
    assert per_prompt_delta_ci(a, b, ids, num_resamples=2000) == pytest.approx((0.5, 0.0, 1.0))
    _, lo, hi = paired_delta_ci(a, b, num_resamples=2000)
    assert hi - lo < 0.6
    # unequal seeds per prompt: the estimate is the mean of per-prompt means, (0 + (1 + 2 + 3) / 3) / 2 = 1
    est, _, _ = per_prompt_delta_ci(np.array([0.0, 1.0, 2.0, 3.0]), np.zeros(4), ["p", "q", "q", "q"])
    assert est == pytest.approx(1.0)
    with pytest.raises(ValueError, match="prompt id"):
        per_prompt_delta_ci(np.zeros(3), np.zeros(3), ["p", "q"])


def test_paired_delta_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="paired"):
        paired_delta_ci(np.zeros(3), np.zeros(4))


def test_pairwise_distance_and_diversity():
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5 / np.sqrt(2))
    assert mean_pairwise_distance(np.array([[0.0], [1.0], [2.0]])) == pytest.approx(4 / 3)  # (1 + 2 + 1) / 3
    assert mean_pairwise_distance(np.ones((1, 5))) == 0.0
    groups = [np.array([[0.0], [1.0]]), np.array([[5.0], [5.0]])]  # 1 and 0
    assert within_prompt_diversity(groups) == pytest.approx(0.5)


def test_rank_correlation():
    np.testing.assert_allclose(ranks(np.array([3.0, 1.0, 1.0])), [3.0, 1.5, 1.5])
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_the_dashboard_reads_the_eval_format_evaluate_writes():
    """dashboard/data.py names the eval files itself (the dashboard imports no torch, so not
    rollout/eval_format.py); the two must agree."""
    from dashboard.data import EVAL_MANIFEST
    from rollout.eval_format import MANIFEST

    assert EVAL_MANIFEST == MANIFEST
