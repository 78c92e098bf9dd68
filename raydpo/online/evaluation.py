"""The numbers of an evaluation: a policy's samples on held-out prompts, scored by a judge, against
a baseline policy's samples on the same prompts (the online rounds' evaluation; ``raydpo eval``).

Plain functions on plain lists: no Ray, no config, no judge. The caller generates, scores and
computes the log-probs; these only reduce them. A judge's failure is a ``None`` score, skipped
(the judge counted its reason); an empty input gives ``nan`` where a number is undefined, never
an exception, so a round with no evaluation prompts still logs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

# The 97.5% quantile of the standard normal, from the standard library (scipy is not a dependency):
# 1.959963984540054. A normal interval, not Student's t: with n = 30 scores t's quantile is 2.045,
# 4% wider; evaluations score tens to thousands of samples.
Z95 = statistics.NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class ScoreStats:
    """Mean, spread and uncertainty of the mean of a set of judge scores."""

    n: int  # scores counted (judge failures left out)
    mean: float  # nan where n = 0
    std: float  # population standard deviation; 0.0 where n < 2
    ci95: float  # half-width of the 95% confidence interval of the mean; nan where n < 2


def score_stats(scores: Sequence[float | None]) -> ScoreStats:
    """Statistics of ``scores`` (shape ``(n,)``, flat over prompts and samples), ``None`` skipped.

    With x the n scores left::

        mean = sum(x) / n
        std  = sqrt(sum((x - mean)^2) / n)                       (statistics.pstdev)
        ci95 = Z95 * s / sqrt(n),  s = sqrt(sum((x - mean)^2) / (n - 1))   (statistics.stdev)

    ``ci95`` is the normal-approximation interval ``mean +- ci95``, Z95 = 1.95996 (statistics.NormalDist).
    It treats the scores as independent; the k samples of one prompt are not (a hard prompt scores
    low k times), so where prompts differ much the true interval is wider.

    Example: [1.0, None, 3.0] -> n = 2, mean = 2.0, std = sqrt((1 + 1) / 2) = 1.0,
    s = sqrt((1 + 1) / 1) = sqrt(2), ci95 = 1.95996 * sqrt(2) / sqrt(2) = 1.95996.
    """
    x = [s for s in scores if s is not None]
    n = len(x)
    if n == 0:
        return ScoreStats(0, math.nan, 0.0, math.nan)
    if n == 1:
        return ScoreStats(1, x[0], 0.0, math.nan)
    return ScoreStats(n, statistics.fmean(x), statistics.pstdev(x), Z95 * statistics.stdev(x) / math.sqrt(n))


def win_rate(model: Sequence[Sequence[float | None]], baseline: Sequence[Sequence[float | None]]) -> float:
    """The fraction of games the model's samples win against the baseline's on the same prompts.

    ``model[i]`` (shape ``(k,)``) and ``baseline[i]`` (shape ``(k',)``) are the scores of the two
    policies' samples of prompt i; every model score plays every baseline score of its prompt::

        win_rate = sum_i sum_{a in model[i], b in baseline[i]} w(a, b) / games
        w(a, b)  = 1 if a > b, 0.5 if a == b, 0 if a < b

    A game with a ``None`` on either side is not played (not counted in ``games``); no game -> nan.

    Example, k = 2 against k' = 2 on one prompt: model [3, 1], baseline [1, None]: the games
    3 vs 1 (1) and 1 vs 1 (0.5) are played, the two against None are not: 1.5 / 2 = 0.75.
    """
    if len(model) != len(baseline):
        raise ValueError(f"scores of {len(model)} prompts for the model but {len(baseline)} for the baseline")
    wins, games = 0.0, 0
    for mine, theirs in zip(model, baseline):
        for a in mine:
            for b in theirs:
                if a is not None and b is not None:
                    wins += 1.0 if a > b else 0.5 if a == b else 0.0
                    games += 1
    return wins / games if games else math.nan


def kl_estimate(logps: Sequence[float], reference_logps: Sequence[float]) -> float:
    """Sequence-level estimate of KL(pi || pi_ref) from samples y ~ pi (shape ``(n,)`` each, the
    same n samples in the same order; a log-prob is summed over the completion's tokens)::

        KL ~= (1 / n) * sum_j (log pi(y_j) - log pi_ref(y_j))

    Unbiased for the KL of whole sequences, but one sample can be negative; nan for no sample.

    Example: logps [-1, -2, -4], reference [-2, -2, -3]: (1 + 0 - 1) / 3 = 0.0.
    """
    if len(logps) != len(reference_logps):
        raise ValueError(f"{len(logps)} log-probs but {len(reference_logps)} reference log-probs")
    if not logps:
        return math.nan
    return statistics.fmean(lp - ref for lp, ref in zip(logps, reference_logps))


@dataclass(frozen=True)
class LengthStats:
    """How long the completions are and how many ended on their own."""

    mean_tokens: float  # nan for no completion
    finished_fraction: float  # ended with EOS, not cut at max_new_tokens; nan for no completion


def length_stats(completions: Sequence[Sequence[int]], finished: Sequence[bool]) -> LengthStats:
    """``completions`` (n token-id lists, EOS included where generated) and ``finished`` (shape ``(n,)``)::

        mean_tokens       = sum_j len(completions[j]) / n
        finished_fraction = count(finished) / n

    Example: lengths 2, 3, 0 with finished [True, False, False] -> mean_tokens 5 / 3, finished 1 / 3.
    """
    if len(completions) != len(finished):
        raise ValueError(f"{len(completions)} completions but {len(finished)} finished flags")
    if not completions:
        return LengthStats(math.nan, math.nan)
    return LengthStats(statistics.fmean(len(c) for c in completions), sum(map(bool, finished)) / len(finished))
