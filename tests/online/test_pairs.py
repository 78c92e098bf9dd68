"""Scored samples -> pairs: the ranked-rows rule, and every prompt accounted for."""
from __future__ import annotations

from raydpo.online.judges import Scored
from raydpo.online.pairs import ALL_TIED, STALE, TOO_FEW_SCORED, make_pairs


def test_best_worst_all_margin_and_the_accounting():
    prompts = [[1], [2], [3], [4]]
    comps = [[[10], [11], [12]], [[20], [21], [22]], [[30], [31], [32]], [[40], [41], [42]]]
    scored = [Scored([0.5, 1.0, 0.0], {}),  # a best and a worst
              Scored([0.3, 0.3, 0.3], {}),  # all tied: no pair
              Scored([None, 0.9, None], {"verifier_error": 2}),  # one scored sample: no pair
              Scored([0.2, None, 0.6], {"unparseable": 1})]  # the failed one left out
    cols, stats = make_pairs(prompts, comps, scored, "best_worst")
    assert list(zip(cols["chosen_ids"], cols["rejected_ids"])) == [([11], [12]), ([42], [40])]
    assert cols["prompt_ids"] == [[1], [4]] and cols["prompt_row"] == [0, 3]
    assert cols["chosen_score"] == [1.0, 0.6] and cols["rejected_score"] == [0.0, 0.2]
    assert stats.pairs == 2 and stats.prompts == 4
    assert stats.skipped == {ALL_TIED: 1, TOO_FEW_SCORED: 1}
    assert stats.judge_failures == {"verifier_error": 2, "unparseable": 1}

    cols, stats = make_pairs(prompts[:1], comps[:1], scored[:1], "all_margin", min_margin=0.4)
    # gaps: 1.0-0.5=0.5, 1.0-0.0=1.0, 0.5-0.0=0.5 all reach 0.4
    assert sorted(zip(cols["chosen_score"], cols["rejected_score"])) == [(0.5, 0.0), (1.0, 0.0), (1.0, 0.5)]
    cols, stats = make_pairs(prompts[:1], comps[:1], scored[:1], "all_margin", min_margin=0.6)
    assert list(zip(cols["chosen_score"], cols["rejected_score"])) == [(1.0, 0.0)]


def test_the_same_tokens_scored_apart_give_no_pair():
    """A noisy judge (an LLM) may score one sampled text twice differently: no preference to learn."""
    cols, stats = make_pairs([[1]], [[[5, 6], [5, 6]]], [Scored([1.0, 0.0], {})])
    assert stats.pairs == 0 and stats.skipped == {ALL_TIED: 1}


def test_samples_outside_the_staleness_bound_give_no_pair_and_are_counted():
    """Round 3 trains policy 2; with max_staleness 1 it accepts samples of versions 1 and 2. The
    prompt sampled from version 0 (two behind) and one from version 3 (not trained yet) are refused."""
    prompts, comps = [[1], [2], [3], [4]], [[[5], [6]]] * 4
    scored = [Scored([1.0, 0.0], {})] * 4
    cols, stats = make_pairs(prompts, comps, scored, versions=[2, 1, 0, 3], accept=(1, 2))
    assert cols["prompt_row"] == [0, 1] and stats.pairs == 2
    assert stats.skipped == {STALE: 2} and "stale 2" in stats.summary()
    _, everything = make_pairs(prompts, comps, scored, versions=[2, 1, 0, 3])  # no bound: all pair
    assert everything.pairs == 4
