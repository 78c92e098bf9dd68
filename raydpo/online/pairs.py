"""Scored samples -> preference pairs, with the ranked-rows rule of the data pipeline
(``raydpo.data.formats.score_pairs``): ``best_worst`` gives at most one pair per prompt, the first
highest against the first lowest; ``all_margin`` every pair whose score gap reaches the
margin. Ties never pair.

Every prompt is accounted for: it gives pairs, or it is skipped with a reason (``all_tied``: no
two scores differ by the margin; ``too_few_scored``: the judge failed on all but one sample;
``stale``: its samples came from a policy older than the staleness bound allows).
Pairs keep the generated token ids as they are: the policy is trained on exactly the tokens it
sampled, with no detokenize-retokenize round trip.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from raydpo.data.formats import PairRule, score_pairs
from raydpo.online.judges import Scored

ALL_TIED = "all_tied"
TOO_FEW_SCORED = "too_few_scored"
STALE = "stale"


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> prompts that gave no pair
    judge_failures: Counter = field(default_factory=Counter)  # reason -> samples (or comparisons) the judge failed on

    def summary(self) -> str:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) or "none"
        failed = ", ".join(f"{r} {n}" for r, n in sorted(self.judge_failures.items())) or "none"
        return f"{self.pairs} pairs from {self.prompts} prompts; skipped: {skipped}; judge failures: {failed}"


def make_pairs(prompt_ids: list[list[int]], completions: list[list[list[int]]], scored: list[Scored],
               mode: PairRule = "best_worst", min_margin: float = 0.0, versions: list[int] | None = None,
               accept: tuple[int, int] | None = None) -> tuple[dict[str, list], PairStats]:
    """One entry per prompt in each list -> pair columns ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, ``chosen_score``, ``rejected_score``, ``prompt_row`` (the index into the
    lists), and the accounting. ``versions``: the policy version each prompt's samples came from;
    a prompt whose version lies outside ``accept`` (oldest, newest; inclusive) gives no pair."""
    cols: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score",
                                             "rejected_score", "prompt_row")}
    stats = PairStats(prompts=len(prompt_ids))
    for row, (prompt, comps, s) in enumerate(zip(prompt_ids, completions, scored, strict=True)):
        if accept is not None and versions is not None and not accept[0] <= versions[row] <= accept[1]:
            stats.skipped[STALE] += 1
            continue
        stats.judge_failures.update(s.failures)
        usable = [i for i, v in enumerate(s.scores) if v is not None]
        if len(usable) < 2:
            stats.skipped[TOO_FEW_SCORED] += 1
            continue
        values = [s.scores[i] for i in usable]
        found = [(usable[c], usable[r]) for c, r in score_pairs(values, mode, min_margin)
                 if comps[usable[c]] != comps[usable[r]]]  # the same tokens scored twice differently: no signal
        if not found:
            stats.skipped[ALL_TIED] += 1
            continue
        for c, r in found:
            cols["prompt_ids"].append(prompt)
            cols["chosen_ids"].append(comps[c])
            cols["rejected_ids"].append(comps[r])
            cols["chosen_score"].append(float(s.scores[c]))
            cols["rejected_score"].append(float(s.scores[r]))
            cols["prompt_row"].append(row)
        stats.pairs += len(found)
    return cols, stats
