"""The verifier and pairwise-LLM judges, and the shipped ``max_task`` verifier.

The pairwise judge's model is stood in for by small deterministic ``complete`` functions here (the
system under test is the judge's logic: pairs, orders, verdicts, counts); tests/actors/test_judge.py
wires it to a real generator.
"""
from __future__ import annotations

import math

import pytest

from raydpo.online.judges import (DEFAULT_PAIRWISE_TEMPLATE, PairwiseLlmJudge, PromptItem, VerifierJudge,
                                  load_function, render_pairwise, verdict)
from raydpo.online.verifiers import max_task


def item(text: str, **row) -> PromptItem:
    return PromptItem(messages=[{"role": "user", "content": text}], text=text, row={"prompt": text, **row})


# --- verifiers named by import path, defined here so that the spec is tests.online.test_judges:... ---

def exact(prompt: str, completion: str, row: dict, bonus: float = 0.0) -> float:
    return (1.0 if completion == row["answer"] else 0.0) + bonus


def picky(prompt: str, completion: str, row: dict):
    """Fails in every way a verifier can, one per completion."""
    if completion == "raise":
        raise RuntimeError("boom")
    return {"nan": math.nan, "inf": math.inf, "none": None, "text": "0.5", "huge": 10**400, "int": 3, "true": True}[completion]


NOT_CALLABLE = 42


def test_verifier_scores_each_completion_with_kwargs():
    judge = VerifierJudge("tests.online.test_judges:exact", {"bonus": 0.25})
    got = judge.score([item("q1", answer="yes"), item("q2", answer="no")], [["yes", "no", "yes"], ["no"]])
    assert [s.scores for s in got] == [[1.25, 0.25, 1.25], [1.25]]
    assert [s.failures for s in got] == [{}, {}]


def test_verifier_failures_are_none_and_counted():
    judge = VerifierJudge("tests.online.test_judges:picky")
    texts = ["raise", "nan", "inf", "none", "text", "huge", "int", "true"]
    [got] = judge.score([item("q")], [texts])
    assert got.scores == [None, None, None, None, None, None, 3.0, 1.0]  # a number is a number, a bool too
    assert got.failures == {"verifier_error": 6}


@pytest.mark.parametrize("spec, why", [
    ("tests.online.test_judges.exact", "expected 'package.module:function'"),
    (":exact", "expected 'package.module:function'"),
    ("tests.online.test_judges:", "expected 'package.module:function'"),
    ("a:b:c", "expected 'package.module:function'"),
    ("tests.online.no_such_module:f", "does not import"),
    ("tests.online.test_judges:no_such_function", "has no attribute 'no_such_function'"),
    ("tests.online.test_judges:NOT_CALLABLE", "is a int, not callable"),
])
def test_bad_specs_say_which_and_why(spec, why):
    with pytest.raises(ValueError, match="function " + repr(spec).replace("(", r"\(") + ".*" + why):
        VerifierJudge(spec)


def test_load_function_finds_a_function():
    assert load_function("raydpo.online.verifiers:max_task") is max_task
    assert load_function("math:sqrt")(9.0) == 3.0


# --- max_task ---

@pytest.mark.parametrize("completion, expected", [
    ("42", 1.0), (" 42\n", 1.0), ("42<|end|>", 1.0), ("42<|end|>junk", 1.0),
    ("42x", 0.8), ("07", 0.6), ("07x", 0.5), ("47", 0.3), ("53", 0.2), ("4", 0.2), ("5", 0.1),
    ("", 0.0), ("xy", 0.0), ("hello world", 0.0), ("<|end|>", 0.0), ("x42", 0.0),
])
def test_max_task_scores(completion, expected):
    assert max_task("max(07,42)=", completion, {}) == pytest.approx(expected)


def test_max_task_credit_rises_towards_the_answer():
    ladder = ["zz", "5z", "53", "47", "07z", "07", "42z", "42"]  # each a step closer to the answer
    scores = [max_task("max(07,42)=", c, {}) for c in ladder]
    assert scores == sorted(scores) and len(set(scores)) == len(scores), scores
    assert scores[0] == 0.0 and scores[-1] == 1.0


def test_max_task_takes_the_answer_from_the_prompt_either_order():
    assert max_task("max(42,07)=", "42", {}) == 1.0
    assert max_task("max(42,07)=", "07", {}) < 1.0
    assert max_task("<|user|>max(99,98)=", "99", {"chosen": "wrong field, unused"}) == 1.0


def test_max_task_rejects_another_prompt_and_the_judge_counts_it():
    with pytest.raises(ValueError, match="not a max"):
        max_task("what is 2+2?", "4", {})
    [got] = VerifierJudge("raydpo.online.verifiers:max_task").score([item("what is 2+2?")], [["4", "5"]])
    assert got.scores == [None, None] and got.failures == {"verifier_error": 2}


def test_max_task_on_the_synthetic_rows():
    from raydpo.data.synthetic import max_rows

    for row in max_rows(20, seed=1):
        assert max_task(row["prompt"], row["chosen"], row) == 1.0
        same_first_digit = row["rejected"][0] == row["chosen"][0]
        assert max_task(row["prompt"], row["rejected"], row) == (0.7 if same_first_digit else 0.6)


# --- the pairwise LLM judge ---

class Recording:
    """A deterministic judge model: ``answer(a, b)`` for the texts shown as A and B; records calls."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, questions: list[str]) -> list[str]:
        self.calls.append(list(questions))
        return [self.answer(*self.shown(q)) for q in questions]

    @staticmethod
    def shown(question: str) -> tuple[str, str]:
        a = question.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
        b = question.split("\n\n[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
        return a, b


def longer(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B is better."


def test_consistent_judge_ranks_by_wins_in_one_batched_call():
    model = Recording(longer)
    judge = PairwiseLlmJudge(model)
    got = judge.score([item("p1"), item("p2")], [["x", "xxx", "xx"], ["yy", "y"]])
    # p1: "xxx" beats both (2/2), "xx" beats "x" (1/2), "x" none (0/2); p2: "yy" beats "y".
    assert [s.scores for s in got] == [[0.0, 1.0, 0.5], [1.0, 0.0]]
    assert [s.failures for s in got] == [{}, {}]
    assert len(model.calls) == 1 and len(model.calls[0]) == 2 * (3 + 1)  # every pair, both orders
    shown = [Recording.shown(q) for q in model.calls[0][:2]]
    assert shown == [("x", "xxx"), ("xxx", "x")]  # the same pair, swapped


def test_a_judge_that_always_says_a_gives_ties_counted_as_position_bias():
    judge = PairwiseLlmJudge(Recording(lambda a, b: "A"))
    [got] = judge.score([item("p")], [["one", "two", "three"]])
    assert got.scores == [0.5, 0.5, 0.5]
    assert got.failures == {"position_bias": 3}


def test_unparseable_answers_are_counted_and_give_no_score():
    judge = PairwiseLlmJudge(Recording(lambda a, b: "Both are Bad, an Apple."))
    [got] = judge.score([item("p")], [["one", "two", "three"]])
    assert got.scores == [None, None, None]
    assert got.failures == {"unparseable": 6}


def test_one_unparseable_order_drops_that_comparison_only():
    # Garbage whenever "bad" is shown as A; otherwise prefers the longer text.
    judge = PairwiseLlmJudge(Recording(lambda a, b: "??" if a == "bad" else longer(a, b)))
    [got] = judge.score([item("p")], [["bad", "good!", "ok"]])
    # bad-good! and bad-ok lose one order each: not counted; good! beats ok.
    assert got.scores == [None, 1.0, 0.0]
    assert got.failures == {"unparseable": 2}


def test_identical_texts_tie_without_asking_and_single_completions_are_counted():
    model = Recording(longer)
    judge = PairwiseLlmJudge(model)
    got = judge.score([item("p"), item("q"), item("r")], [["same", "same", "longest"], ["alone"], []])
    assert got[0].scores == [0.25, 0.25, 1.0]  # each "same": a tie (0.5) and a loss to "longest"
    assert got[0].failures == {"identical": 1}
    assert got[1].scores == [None] and got[1].failures == {"too_few_completions": 1}
    assert got[2].scores == [] and got[2].failures == {"too_few_completions": 1}
    assert len(model.calls) == 1 and len(model.calls[0]) == 4  # the identical pair was not asked


def test_nothing_to_ask_makes_no_call():
    model = Recording(longer)
    got = PairwiseLlmJudge(model).score([item("p")], [["same", "same"]])
    assert got[0].scores == [0.5, 0.5] and model.calls == []


def test_texts_with_braces_and_placeholders_are_shown_as_they_are():
    text_a, text_b = "use {b} and {{x}}", "{prompt} {a} {0} }{"
    question = render_pairwise(DEFAULT_PAIRWISE_TEMPLATE, "p {a}", text_a, text_b)
    assert "[Prompt]\np {a}\n\n[Response A]\nuse {b} and {{x}}\n\n[Response B]\n{prompt} {a} {0} }{\n\n" in question
    model = Recording(longer)
    PairwiseLlmJudge(model).score([item("p {a}")], [[text_a, text_b]])
    assert Recording.shown(model.calls[0][0]) == (text_a, text_b)


def test_verdict_is_the_first_standalone_letter():
    assert [verdict(a) for a in ["A", " B.", "Answer: B", "(A) or B", "ABBA", "Because", "a", "", "B\nA"]] == [
        "A", "B", "B", "A", None, None, None, None, "B"]


def test_template_must_have_its_placeholders_and_answers_must_match_questions():
    with pytest.raises(ValueError, match=r"lacks \{b\}"):
        PairwiseLlmJudge(longer, "{prompt} {a}")
    judge = PairwiseLlmJudge(lambda questions: ["A"])
    with pytest.raises(ValueError, match="1 answers to 2 questions"):
        judge.score([item("p")], [["x", "y"]])
    with pytest.raises(ValueError, match="1 prompts but 2 lists"):
        judge.score([item("p")], [["x", "y"], ["z"]])
