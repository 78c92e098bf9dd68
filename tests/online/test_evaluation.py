"""raydpo.online.evaluation on three-element inputs, each value worked by hand in the comment."""
from __future__ import annotations

import math

import pytest

from raydpo.online.evaluation import Z95, kl_estimate, length_stats, score_stats, win_rate


def test_z95_is_the_normal_quantile():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert Z95 == pytest.approx(scipy_stats.norm.ppf(0.975), abs=1e-12)
    assert Z95 == pytest.approx(1.959964, abs=1e-6)


def test_score_stats_by_hand():
    # [1, 2, 6]: mean 3; squared deviations 4, 1, 9 = 14; std sqrt(14 / 3); s = sqrt(14 / 2) = sqrt(7);
    # ci95 = 1.959964 * sqrt(7) / sqrt(3) = 1.959964 * 1.5275252 = 2.993894.
    st = score_stats([1.0, 2.0, 6.0])
    assert (st.n, st.mean) == (3, 3.0)
    assert st.std == pytest.approx(math.sqrt(14 / 3))
    assert st.ci95 == pytest.approx(2.993894, abs=1e-6)


def test_score_stats_ci_is_scipys_normal_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [1.0, 2.0, 6.0]
    lo, hi = scipy_stats.norm.interval(0.95, loc=3.0, scale=scipy_stats.sem(x))
    assert score_stats(x).ci95 == pytest.approx((hi - lo) / 2)


def test_score_stats_skips_failures():
    # [1, None, 3]: n 2, mean 2, std sqrt((1 + 1) / 2) = 1, ci95 = Z95 * sqrt(2) / sqrt(2) = Z95.
    st = score_stats([1.0, None, 3.0])
    assert (st.n, st.mean, st.std) == (2, 2.0, 1.0)
    assert st.ci95 == pytest.approx(Z95)


def test_score_stats_of_one_and_of_none():
    one = score_stats([None, 4.0, None])  # one score: a mean, no spread, no interval
    assert (one.n, one.mean, one.std) == (1, 4.0, 0.0) and math.isnan(one.ci95)
    empty = score_stats([])
    assert (empty.n, empty.std) == (0, 0.0) and math.isnan(empty.mean) and math.isnan(empty.ci95)
    assert score_stats([None, None, None]).n == 0


def test_win_rate_counts_a_tie_half():
    # Three prompts, k = 1: 3 > 1 wins (1), 2 == 2 ties (0.5), 0 < 5 loses (0): 1.5 / 3 = 0.5.
    assert win_rate([[3.0], [2.0], [0.0]], [[1.0], [2.0], [5.0]]) == 0.5
    # Three wins and a tie of three: 2.5 / 3.
    assert win_rate([[3.0], [2.0], [9.0]], [[1.0], [2.0], [5.0]]) == pytest.approx(2.5 / 3)


def test_win_rate_k2_against_k2_plays_every_pair_of_the_same_prompt():
    # Prompt 0: model [3, 1] vs baseline [2, 1]: 3>2 (1), 3>1 (1), 1<2 (0), 1==1 (0.5) = 2.5 of 4.
    # Prompt 1: model [0, 0] vs baseline [1, 1]: four losses = 0 of 4. Total 2.5 / 8; prompt 0's
    # scores never meet prompt 1's (else 3 and 1 would also beat prompt 1's ones).
    assert win_rate([[3.0, 1.0], [0.0, 0.0]], [[2.0, 1.0], [1.0, 1.0]]) == 2.5 / 8


def test_win_rate_skips_the_games_of_a_failure():
    # Model [3, None] vs baseline [1, None]: only 3 vs 1 is played: 1 / 1. A prompt whose every
    # score failed plays no game and does not count as a loss.
    assert win_rate([[3.0, None], [None, None]], [[1.0, None], [2.0, 2.0]]) == 1.0
    # Model [3, 1] vs [1, None]: 3>1 (1) and 1==1 (0.5): 1.5 / 2.
    assert win_rate([[3.0, 1.0]], [[1.0, None]]) == 0.75


def test_win_rate_with_no_game_is_nan_and_needs_the_same_prompts():
    assert math.isnan(win_rate([], []))
    assert math.isnan(win_rate([[None]], [[1.0]]))
    with pytest.raises(ValueError, match="2 prompts for the model but 1"):
        win_rate([[1.0], [2.0]], [[1.0]])


def test_a_policy_against_its_own_scores_wins_half():
    # Round 0's evaluation: the initial policy's scores against themselves. [1, 2, 3] x [1, 2, 3]:
    # 3 ties (1.5) + 3 wins + 3 losses = 4.5 / 9 = 0.5.
    assert win_rate([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]) == 0.5


def test_kl_estimate_by_hand():
    # gaps -1 - -2 = 1, -2 - -2 = 0, -4 - -3 = -1: mean 0.
    assert kl_estimate([-1.0, -2.0, -4.0], [-2.0, -2.0, -3.0]) == 0.0
    # gaps 1, 2, 3.5: mean 6.5 / 3.
    assert kl_estimate([-1.0, 0.0, -0.5], [-2.0, -2.0, -4.0]) == pytest.approx(6.5 / 3)
    assert math.isnan(kl_estimate([], []))
    with pytest.raises(ValueError, match="3 log-probs but 2"):
        kl_estimate([-1.0, -2.0, -3.0], [-1.0, -2.0])


def test_length_stats_by_hand():
    # lengths 2, 3, 0 = 5 tokens over 3 completions; one of three finished.
    st = length_stats([[5, 2], [7, 7, 7], []], [True, False, False])
    assert st.mean_tokens == pytest.approx(5 / 3) and st.finished_fraction == pytest.approx(1 / 3)
    empty = length_stats([], [])
    assert math.isnan(empty.mean_tokens) and math.isnan(empty.finished_fraction)
    with pytest.raises(ValueError, match="2 completions but 1 finished"):
        length_stats([[1], [2]], [True])
