"""Tests of ``raydpo.data.formats.normalise``: every known row shape -> ``{prompt, chosen, rejected}``
of chat messages, or ``(None, reason)``; it never raises."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydpo.data.formats import (
    EMPTY,
    IDENTICAL,
    MISSING_FIELD,
    NO_COMMON_PREFIX,
    UNPARSEABLE,
    hh_transcript,
    normalise,
)
from tests.data.checks import assert_normalised, hostile_text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- shapes that are kept ---------------------------------------------------------------------


def test_trl_standard_strings() -> None:
    row = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "extra": 1}
    assert normalise(row) == (
        {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        "",
    )


def test_trl_conversational_message_lists() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("2+2?")]
    row = {"prompt": prompt, "chosen": [assistant("4")], "rejected": [assistant("22")]}
    out, reason = normalise(row)
    assert reason == ""
    assert out == {"prompt": prompt, "chosen": [assistant("4")], "rejected": [assistant("22")]}


def test_messages_keep_only_role_and_content() -> None:
    row = {"prompt": [{"role": "user", "content": "Q", "name": "x"}], "chosen": [assistant("A")], "rejected": [assistant("B")]}
    out, _ = normalise(row)
    assert out is not None and out["prompt"] == [user("Q")]


def test_ultrafeedback_completion_is_only_the_assistant_turn() -> None:
    """UltraFeedback-binarized: prompt is a string; chosen/rejected repeat the prompt turn."""
    row = {
        "prompt": "Name a prime.",
        "chosen": [user("Name a prime."), assistant("7")],
        "rejected": [user("Name a prime."), assistant("8")],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    out, reason = normalise(row)
    assert reason == ""
    assert out == {"prompt": [user("Name a prime.")], "chosen": [assistant("7")], "rejected": [assistant("8")]}


def test_ultrafeedback_multi_turn_prompt() -> None:
    prompt = [user("a"), assistant("b"), user("c")]
    row = {"prompt": prompt, "chosen": prompt + [assistant("good")], "rejected": prompt + [assistant("bad")]}
    out, reason = normalise(row)
    assert reason == ""
    assert out == {"prompt": prompt, "chosen": [assistant("good")], "rejected": [assistant("bad")]}


HH_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"


def _alternates(messages: list[dict[str, str]]) -> bool:
    roles = [m["role"] for m in messages]
    return roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)


def test_hh_implicit_prompt_multi_turn() -> None:
    row = {"chosen": HH_PREFIX + " Banana.", "rejected": HH_PREFIX + " I won't."}
    out, reason = normalise(row)
    assert reason == ""
    assert out == {
        "prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit.")],
        "chosen": [assistant("Banana.")],
        "rejected": [assistant("I won't.")],
    }
    assert _alternates(out["prompt"]) and out["prompt"][-1]["role"] == "user"


def test_hh_completions_sharing_a_leading_word_split_at_the_marker() -> None:
    """"Apple" and "Apricot" share "Ap": the split is still at the last common "\\n\\nAssistant:",
    never inside a word."""
    row = {"chosen": HH_PREFIX + " Apple, a sweet one.", "rejected": HH_PREFIX + " Apricot."}
    out, reason = normalise(row)
    assert reason == ""
    assert out["chosen"] == [assistant("Apple, a sweet one.")]
    assert out["rejected"] == [assistant("Apricot.")]
    assert out["prompt"][-1] == user("Name a fruit.")


def test_hh_completions_sharing_a_whole_sentence() -> None:
    row = {"chosen": HH_PREFIX + " Sure. Apple.", "rejected": HH_PREFIX + " Sure. No."}
    out, _ = normalise(row)
    assert out["chosen"] == [assistant("Sure. Apple.")] and out["rejected"] == [assistant("Sure. No.")]


def test_hh_split_is_at_the_last_common_assistant_marker() -> None:
    """Dialogues that agree for two assistant turns and differ in the third: the prompt is the
    first five turns, not the first one or three."""
    common = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d\n\nHuman: e\n\nAssistant:"
    out, reason = normalise({"chosen": common + " yes", "rejected": common + " no"})
    assert reason == ""
    assert [m["content"] for m in out["prompt"]] == ["a", "b", "c", "d", "e"]
    assert _alternates(out["prompt"])


def test_hh_one_completion_extends_the_other() -> None:
    row = {"chosen": HH_PREFIX + " Yes", "rejected": HH_PREFIX + " Yes, and a long digression."}
    out, reason = normalise(row)
    assert reason == ""
    assert out["chosen"] == [assistant("Yes")]
    assert out["rejected"] == [assistant("Yes, and a long digression.")]


def test_hh_transcript() -> None:
    assert hh_transcript("\n\nHuman: a\n\nAssistant: b") == [user("a"), assistant("b")]
    assert hh_transcript("no markers") is None


# --- drop reasons -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "rejected": "a"},
        {"prompt": "q", "chosen": None, "rejected": "b"},
        {},
        {"question": "q", "answer": "a"},
        # No prompt and not HH strings: the prompt is missing.
        {"chosen": [assistant("a")], "rejected": [assistant("b")]},
    ],
)
def test_missing_field(row: dict) -> None:
    assert normalise(row) == (None, MISSING_FIELD)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "chosen": "", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "  \n\t "},
        {"prompt": "q", "chosen": [], "rejected": [assistant("b")]},
        {"prompt": "q", "chosen": [assistant(" ")], "rejected": [assistant("b")]},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "   ", "chosen": "a", "rejected": "b"},
        {"prompt": [], "chosen": "a", "rejected": "b"},
        {"chosen": HH_PREFIX + " ", "rejected": HH_PREFIX + " no"},
    ],
)
def test_empty(row: dict) -> None:
    assert normalise(row) == (None, EMPTY)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": [assistant("x")], "rejected": [assistant("x")]},
        {"chosen": HH_PREFIX + " same", "rejected": HH_PREFIX + " same"},
        # Differ only in surrounding whitespace, which HH parsing strips.
        {"chosen": HH_PREFIX + " same", "rejected": HH_PREFIX + " same  "},
    ],
)
def test_identical(row: dict) -> None:
    assert normalise(row) == (None, IDENTICAL)


@pytest.mark.parametrize(
    "row",
    [
        {"chosen": "Hello", "rejected": "World"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
    ],
)
def test_no_common_prefix(row: dict) -> None:
    assert normalise(row) == (None, NO_COMMON_PREFIX)


@pytest.mark.parametrize(
    "row",
    [
        None,
        "a string row",
        ["prompt", "chosen", "rejected"],
        42,
        {"prompt": 5, "chosen": "a", "rejected": "b"},
        {"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        {"prompt": "q", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"},
        {"prompt": ["not a message"], "chosen": "a", "rejected": "b"},
    ],
)
def test_unparseable(row: object) -> None:
    assert normalise(row) == (None, UNPARSEABLE)


def test_wrong_types_without_prompt_are_unparseable() -> None:
    assert normalise({"chosen": 3, "rejected": 4}) == (None, UNPARSEABLE)


# --- fuzzing ----------------------------------------------------------------------------------

_KEYS = st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "x"])
_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", " ", ""]),
    # Huge strings, cheaply: one character repeated.
    st.builds(lambda c, k: c * k, st.sampled_from(["a", " ", "\n", "é"]), st.integers(10_000, 100_000)),
    hostile_text(),  # lone surrogates, NUL and other odd characters
)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _TEXT)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_KEYS | st.text(max_size=5), children, max_size=4)),
    max_leaves=15,
)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": _TEXT})
_FIELD = st.one_of(_JSON, _TEXT, st.lists(_MESSAGE, max_size=4), st.builds(lambda t: "\n\nHuman: q\n\nAssistant:" + t, _TEXT))
_ROWS = st.one_of(
    _JSON,
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected"]), _FIELD, max_size=3),
    st.fixed_dictionaries({"chosen": _FIELD, "rejected": _FIELD}),
)




@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_ROWS)
def test_fuzz_never_raises(row: object) -> None:
    out, reason = normalise(row)
    assert_normalised(out, reason)
    if out is not None:
        assert all(any(m["content"].strip() for m in out[k]) for k in out)


def test_huge_hh_strings() -> None:
    """A megabyte of common prefix is handled (and fast)."""
    body = "x" * 1_000_000
    out, reason = normalise({"chosen": "\n\nHuman: " + body + "\n\nAssistant: a", "rejected": "\n\nHuman: " + body + "\n\nAssistant: b"})
    assert reason == ""
    assert out["prompt"] == [user(body)]
