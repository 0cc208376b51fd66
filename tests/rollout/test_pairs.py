"""Pair strategies on hand-made score tables."""

import numpy as np
import pytest

from core.errors import ConfigError
from rollout.pairs import (
    PairConfig,
    agreement_pairs,
    best_worst_pairs,
    margin_pairs,
    nextstep_pairs,
    prompt_rng,
    rank,
    select_pairs,
)


def test_rank_is_descending_with_ties_by_index():
    assert rank(np.array([0.2, 0.9, 0.2, 0.5])).tolist() == [1, 3, 0, 2]


def test_best_worst():
    assert best_worst_pairs(np.array([0.3, 0.1, 0.8, 0.1])) == [(2, 3)]  # worst tie: the later index ranks last
    assert best_worst_pairs(np.array([0.5, 0.5])) == []  # no preference in a flat group


def test_margin_pairs_lists_all_gaps_above_the_margin_largest_first():
    s = np.array([1.0, 0.0, 0.6])
    # gaps: (0,1)=1.0, (0,2)=0.4, (2,1)=0.6
    assert margin_pairs(s, 0.5) == [(0, 1), (2, 1)]
    assert margin_pairs(s, 0.0) == [(0, 1), (2, 1), (0, 2)]
    assert margin_pairs(s, 0.0, max_pairs=1) == [(0, 1)]


def test_agreement_keeps_only_pairs_every_reward_orders_the_same_way():
    primary = np.array([3.0, 2.0, 1.0])
    other = np.array([0.1, 0.5, 0.0])  # disagrees on (0, 1) only
    assert agreement_pairs(primary, [other], margin=0.0) == [(0, 2), (1, 2)]
    assert agreement_pairs(primary, [other], margin=1.5) == [(0, 2)]


def test_nextstep_draws_winners_from_top4_and_losers_from_the_other_12():
    scores = np.arange(16, dtype=float)[::-1].copy()  # sample i scores 15 - i: top 4 are samples 0..3
    rng = np.random.default_rng(0)
    winners, losers = set(), set()
    for _ in range(300):
        ((w, l),) = nextstep_pairs(scores, rng, top_k=4, num_pairs=1)
        winners.add(w)
        losers.add(l)
    assert winners == {0, 1, 2, 3}
    assert losers == set(range(4, 16))


def test_nextstep_pairs_are_distinct_and_ordered():
    scores = np.linspace(1, 0, 16)
    pairs = nextstep_pairs(scores, np.random.default_rng(1), top_k=4, num_pairs=48)  # all 4 x 12 cells
    assert len(set(pairs)) == 48
    assert all(scores[w] > scores[l] for w, l in pairs)


def test_prompt_rng_is_a_pure_function_of_seed_and_prompt():
    a = prompt_rng(0, "abc").integers(0, 10**9, 4).tolist()
    assert a == prompt_rng(0, "abc").integers(0, 10**9, 4).tolist()
    assert a != prompt_rng(1, "abc").integers(0, 10**9, 4).tolist()


def test_select_pairs_dispatches_on_the_strategy():
    table = {"ir": np.array([0.0, 2.0, 1.0]), "hps": np.array([0.3, 0.1, 0.2])}
    rng = np.random.default_rng(0)
    assert select_pairs(PairConfig(strategy="best_worst", primary="ir"), table, rng) == [(1, 0)]
    assert select_pairs(PairConfig(strategy="margin", primary="hps", margin=0.15, pairs_per_prompt=0), table, rng) == [
        (0, 1)
    ]
    agree = PairConfig(strategy="agreement", primary="ir", agreement_rewards=["hps"], pairs_per_prompt=0)
    assert select_pairs(agree, table, rng) == []  # hps reverses every pair ir prefers


def test_impossible_sizes_fail_at_load():
    with pytest.raises(ConfigError, match="top_k"):
        PairConfig(top_k=4).check_group(4)
    with pytest.raises(ConfigError, match="pairs_per_prompt"):
        PairConfig(top_k=2, pairs_per_prompt=5).check_group(4)  # only 2 x 2 distinct pairs
    with pytest.raises(ConfigError, match="agreement_rewards"):
        PairConfig(strategy="agreement").validate()
    with pytest.raises(ConfigError, match=">= 2 samples"):
        PairConfig(strategy="best_worst").check_group(1)
