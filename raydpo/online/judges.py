"""Judges of iterative online DPO: each scores the k sampled completions of every prompt, so that
the pair step can take a better and a worse one.

- :class:`VerifierJudge`: a Python function named by import path (``module:function``) scores each
  completion, e.g. against a known answer (:mod:`raydpo.online.verifiers`).
- :class:`PairwiseLlmJudge`: a judge model compares two completions of a prompt, asked in both
  orders, because LLM judges prefer a position; a completion scores its share of the comparisons won.
- The reward-model judge holds a model, so it lives in ``actors/judge.py``.

A judge never crashes on one bad completion and never drops one silently: a completion it cannot
score gets ``None``, and the reason is counted in :attr:`Scored.failures`. Plain Python: no Ray, no
MLflow; the caller places the work and records the counts.
"""
from __future__ import annotations

import importlib
import itertools
import logging
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One prompt as a judge sees it."""

    messages: list[dict[str, str]]  # the prompt as chat messages [{role, content}, ...]
    text: str  # the prompt as plain text: the content of the last user message
    row: dict[str, Any]  # the whole original prompt row (extra fields, e.g. a reference answer)


@dataclass
class Scored:
    """The judge's scores of one prompt's completions, in their order."""

    scores: list[float | None]  # None where the judge failed on that completion
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count, for this prompt


class Judge(Protocol):
    def score(self, prompts: list[PromptItem], completions: list[list[str]]) -> list[Scored]:
        """``completions[i]`` are the completion texts of ``prompts[i]``; one :class:`Scored` per prompt."""
        ...


def _count(failures: dict[str, int], reason: str, n: int = 1) -> None:
    failures[reason] = failures.get(reason, 0) + n


def _check_lengths(prompts: list[PromptItem], completions: list[list[str]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} lists of completions")


def load_function(spec: str) -> Callable[..., Any]:
    """The function that ``"package.module:function"`` names; a ``ValueError`` naming the spec and
    what is wrong with it (not that form, module not importable, no such attribute, not callable)."""
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"function {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not found, or the module itself fails on import
        raise ValueError(f"function {spec!r}: module {module_name!r} does not import: "
                         f"{type(e).__name__}: {e}") from e
    target: Any = module
    for part in attr.split("."):  # "module:Class.method" also names a function
        if not hasattr(target, part):
            raise ValueError(f"function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"function {spec!r}: {attr!r} is a {type(target).__name__}, not callable")
    return target


class VerifierJudge:
    """Scores each completion with ``fn(prompt_text, completion, row, **kwargs) -> float | None``.

    An exception, ``None``, NaN/inf or a non-number from the function is that completion's failure:
    score ``None``, ``failures["verifier_error"] += 1``; the first error of a call is logged, so the
    count has a cause to look at."""

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.fn = load_function(spec)  # at once: a wrong spec fails the run before any sampling
        self.kwargs = dict(kwargs or {})

    def score(self, prompts: list[PromptItem], completions: list[list[str]]) -> list[Scored]:
        _check_lengths(prompts, completions)
        out, errors, first_error = [], 0, ""
        for prompt, texts in zip(prompts, completions):
            scored = Scored([])
            for text in texts:
                value, error = self._one(prompt, text)
                if value is None:
                    _count(scored.failures, "verifier_error")
                    errors += 1
                    first_error = first_error or error
                scored.scores.append(value)
            out.append(scored)
        if errors:
            log.warning("verifier %s failed on %d completions; the first: %s", self.spec, errors, first_error)
        return out

    def _one(self, prompt: PromptItem, text: str) -> tuple[float | None, str]:
        try:
            value = self.fn(prompt.text, text, prompt.row, **self.kwargs)
        except Exception as e:  # one completion's failure, counted; never the whole round's
            return None, f"{type(e).__name__}: {e}"
        # numbers.Real: int, float, bool and numpy scalars; not str, None or a tensor.
        try:
            number = float(value) if isinstance(value, numbers.Real) else math.nan
        except OverflowError:  # an int too large for a float
            number = math.nan
        if not math.isfinite(number):
            return None, f"returned {value!r}, not a finite number"
        return number, ""


DEFAULT_PAIRWISE_TEMPLATE = (
    "You compare two responses to a prompt and say which one is better: more correct, more helpful, "
    "more to the point.\n\n"
    "[Prompt]\n{prompt}\n\n"
    "[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\n"
    "Which response is better? Answer with one letter, A or B."
)

_PLACEHOLDER = re.compile(r"\{(prompt|a|b)\}")
_VERDICT = re.compile(r"\b([AB])\b")


def render_pairwise(template: str, prompt: str, a: str, b: str) -> str:
    """``template`` with ``{prompt}``, ``{a}``, ``{b}`` filled in, in one pass: braces in the texts
    stay as they are, and a text that itself contains ``{a}`` is not filled in again."""
    values = {"prompt": prompt, "a": a, "b": b}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def verdict(answer: str) -> str | None:
    """The answer's first standalone ``A`` or ``B``; None if it has none."""
    m = _VERDICT.search(answer)
    return m.group(1) if m else None


class PairwiseLlmJudge:
    """A judge model compares every unordered pair of a prompt's completions, once in each order.

    Both orders pick the same completion: it wins the comparison (1), the other loses (0). They pick
    different ones (the judge followed the position): a tie, 0.5 each, counted as
    ``failures["position_bias"]``. An answer without a verdict counts ``failures["unparseable"]``
    and its comparison is not counted. Two identical texts are a tie without asking the judge
    (``failures["identical"]``): both orders would be the same question, so the judge could only
    agree with itself and show a position bias that is not one. A completion's score is the mean over
    its counted comparisons; None if it has none. A prompt with fewer than two completions has no
    pairs: ``failures["too_few_completions"]``.

    ``complete`` takes the judge prompts (plain text) and returns the judge model's answers, one
    each; the caller wires it to a generator with greedy sampling (``actors.judge.generator_complete``).
    All questions of a :meth:`score` call go to it in one call, so a batched engine sees them together.
    """

    def __init__(self, complete: Callable[[list[str]], list[str]], template: str = DEFAULT_PAIRWISE_TEMPLATE) -> None:
        missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in template]
        if missing:
            raise ValueError(f"pairwise judge template lacks {', '.join(missing)}")
        self.complete = complete
        self.template = template

    def score(self, prompts: list[PromptItem], completions: list[list[str]]) -> list[Scored]:
        _check_lengths(prompts, completions)
        # Every question of the call first, then one batched call to the judge model.
        questions: list[str] = []
        asked: list[tuple[int, int, int]] = []  # (prompt, first, second): the pair whose two questions start at 2*n
        for p, (prompt, texts) in enumerate(zip(prompts, completions)):
            for x, y in itertools.combinations(range(len(texts)), 2):
                if texts[x] == texts[y]:
                    continue
                questions.append(render_pairwise(self.template, prompt.text, texts[x], texts[y]))
                questions.append(render_pairwise(self.template, prompt.text, texts[y], texts[x]))
                asked.append((p, x, y))
        answers = self.complete(questions) if questions else []
        if len(answers) != len(questions):
            raise ValueError(f"the judge's complete() gave {len(answers)} answers to {len(questions)} questions")

        wins = [[0.0] * len(texts) for texts in completions]
        counted = [[0] * len(texts) for texts in completions]
        failures: list[dict[str, int]] = [{} for _ in prompts]
        for p, texts in enumerate(completions):
            if len(texts) < 2:
                _count(failures[p], "too_few_completions")
            for x, y in itertools.combinations(range(len(texts)), 2):
                if texts[x] == texts[y]:
                    self._add(wins[p], counted[p], x, y, 0.5)
                    _count(failures[p], "identical")
        for n, (p, x, y) in enumerate(asked):
            first, second = verdict(answers[2 * n]), verdict(answers[2 * n + 1])
            unparseable = (first is None) + (second is None)
            if unparseable:
                _count(failures[p], "unparseable", unparseable)
                continue
            # The first question shows x as A, the second shows y as A.
            x_won_first, x_won_second = first == "A", second == "B"
            if x_won_first == x_won_second:
                self._add(wins[p], counted[p], x, y, 1.0 if x_won_first else 0.0)
            else:
                self._add(wins[p], counted[p], x, y, 0.5)
                _count(failures[p], "position_bias")
        return [Scored([w / c if c else None for w, c in zip(wins[p], counted[p])], failures[p])
                for p in range(len(prompts))]

    @staticmethod
    def _add(wins: list[float], counted: list[int], x: int, y: int, x_share: float) -> None:
        """One counted comparison of ``x`` and ``y``: ``x`` gets ``x_share``, ``y`` the rest."""
        wins[x] += x_share
        wins[y] += 1.0 - x_share
        counted[x] += 1
        counted[y] += 1
