"""Hostile rows (issue 12): lone surrogates, nesting past the parser's stack, chat templates that
raise, NUL bytes, huge strings and wrong types at every level. Each is a counted drop with a
specific reason, never an exception, and every row is accounted for. No Ray here: the pipeline's
own functions run in-process on many generated rows per example (``checks.hostile_rows``); the
Ray pipeline and the data-check job get the same rows in test_pipeline_fuzz.py and
tests/jobs/test_data_check.py.

Rows generated here: 20 x 500 through parse + normalise, 12 x 300 through ``tokenize_batch``, and
150 x 1-4 message lists through ``tokenize_pair`` (about 14,000).
"""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydpo.data import tokenize
from raydpo.data.formats import (
    FORMATS,
    INVALID_UNICODE,
    NON_TEXT_CONTENT,
    REASONS,
    TEMPLATE_ERROR,
    TOO_DEEPLY_NESTED,
    TOO_LONG,
    UNKNOWN_ROLE,
    UNPARSEABLE,
    is_valid_text,
    normalise,
    normalise_pairs,
    parse_row,
)
from raydpo.data.pipeline import tokenize_batch
from raydpo.data.tokenize import PLAIN_CHAT_TEMPLATE, TokenizeSettings, check_chat_template, tokenize_pair
from raydpo.models import build_tiny_tokenizer
from tests.data.checks import (
    GEMMA_TEMPLATE,
    MISTRAL_TEMPLATE,
    PY_ERRORS_TEMPLATE,
    TEMPLATES,
    assert_normalised,
    assert_reason,
    bpe_tokenizer,
    hostile_rows,
    hostile_text,
)

SETTINGS = TokenizeSettings(max_length=96, max_prompt_length=48)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def toks(tok):
    """The tiny character-level tokenizer and a byte-level BPE whose merges cross turn boundaries
    (so the offsets path that re-locates a boundary runs too)."""
    corpus = ["User: hi\n\nAssistant: Yes<eos>", "a b c é 😀 \x00 text text", "<start_of_turn>model\n[INST] q [/INST]"] * 20
    return {"tiny": tok, "bpe": bpe_tokenizer(use_regex=False, corpus=corpus)}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- the three crashes of issue 12, one by one ---------------------------------------------------


def test_lone_surrogate_is_invalid_unicode(tok) -> None:
    row, reason = parse_row(json.dumps({"prompt": "hi \ud800", "chosen": "a", "rejected": "b"}))
    assert reason == "" and row["prompt"] == "hi \ud800"
    assert normalise(row) == (None, INVALID_UNICODE)
    # A surrogate in a role is caught the same way; an escaped one ("\\ud800" as text) is fine.
    assert normalise({"prompt": [{"role": "us\udfffer", "content": "q"}], "chosen": "a", "rejected": "b"}) == (None, INVALID_UNICODE)
    assert normalise({"prompt": "\\ud800", "chosen": "a", "rejected": "b"})[1] == ""
    # tokenize_pair guards itself too, for callers that skip normalise: no TypeError from the tokenizer.
    assert tokenize_pair(tok, [user("q\udc00")], [assistant("a")], [assistant("b")], SETTINGS).drop_reason == INVALID_UNICODE


def test_is_valid_text() -> None:
    assert is_valid_text("") and is_valid_text("ascii") and is_valid_text("é😀\x00\uffff\U0010ffff")
    assert not is_valid_text("\ud800") and not is_valid_text("a\udfffb") and not is_valid_text("é\udc80")


@pytest.mark.parametrize("text", ["[" * 20_000, "[" * 20_000 + "]" * 20_000, '{"a":' * 20_000,
                                  '{"prompt": "q", "chosen": ' + "[" * 5_000 + "]" * 5_000 + ', "rejected": "b"}'])
def test_nesting_past_the_parser_stack_is_too_deeply_nested(text: str) -> None:
    assert parse_row(text) == (None, TOO_DEEPLY_NESTED)


def test_parse_row_reasons() -> None:
    assert parse_row('{"prompt": "cut') == (None, UNPARSEABLE)
    assert parse_row("9" * 5000) == (None, UNPARSEABLE)  # past int's 4300-digit limit: a ValueError
    assert parse_row("null") == (None, "")  # parses; normalise drops it
    assert parse_row("[" * 300 + "]" * 300)[1] == ""  # deep, but within the stack: normalise drops it
    assert normalise(parse_row("[" * 300 + "]" * 300)[0]) == (None, UNPARSEABLE)


@pytest.mark.parametrize(("template", "prompt"), [
    (GEMMA_TEMPLATE, [{"role": "system", "content": "Be brief."}, user("q")]),  # Gemma: no system role
    (MISTRAL_TEMPLATE, [user("q"), user("again")]),  # Mistral: roles must alternate
    (MISTRAL_TEMPLATE, [{"role": "tool", "content": "x"}]),
    (PY_ERRORS_TEMPLATE, [user("q #div")]),  # ZeroDivisionError
    (PY_ERRORS_TEMPLATE, [user("q #add")]),  # TypeError
    (PY_ERRORS_TEMPLATE, [user("q #val")]),  # ValueError
    (PY_ERRORS_TEMPLATE, [user("q #undef")]),  # jinja's UndefinedError
])
def test_template_that_raises_is_template_error(tok, template: str, prompt: list[dict[str, str]]) -> None:
    t = tokenize_pair(tok, prompt, [assistant("a")], [assistant("b")], SETTINGS, template)
    assert (t.drop_reason, t.prompt_ids, t.chosen_ids) == (TEMPLATE_ERROR, [], [])
    # The same templates keep an ordinary pair.
    ok = tokenize_pair(tok, [user("q")], [assistant("a")], [assistant("b")], SETTINGS, template)
    assert ok.drop_reason == "" and ok.chosen_ids


def test_template_that_raises_only_on_the_completion(tok) -> None:
    """The prompt renders; the whole with one completion does not: the pair is dropped, not half-made."""
    t = tokenize_pair(tok, [user("q")], [assistant("a #add")], [assistant("b")], SETTINGS, PY_ERRORS_TEMPLATE)
    assert t.drop_reason == TEMPLATE_ERROR


def test_template_that_does_not_compile_is_the_runs_error(tok) -> None:
    broken = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(ValueError, match=r"chat template line 1: "):
        check_chat_template(broken)
    for template in (*TEMPLATES.values(), PLAIN_CHAT_TEMPLATE):
        if template:
            check_chat_template(template)
    # Inside tokenize_pair it is not turned into a per-row drop either.
    import jinja2

    with pytest.raises(jinja2.TemplateSyntaxError):
        tokenize_pair(tok, [user("q")], [assistant("a")], [assistant("b")], SETTINGS, broken)


def test_nul_bytes_and_huge_strings_tokenize(tok) -> None:
    t = tokenize_pair(tok, [user("a\x00b")], [assistant("\x00")], [assistant("c")], SETTINGS)
    assert t.drop_reason == "" and t.chosen_ids
    huge = "é" * 50_000
    t = tokenize_pair(tok, [user(huge)], [assistant(huge)], [assistant("c")], SETTINGS)
    assert t.drop_reason == "" and t.truncated
    assert len(t.prompt_ids) == SETTINGS.max_prompt_length and len(t.prompt_ids) + len(t.chosen_ids) <= SETTINGS.max_length


# --- generated rows, many per example ------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(("auto", *FORMATS)))
def test_generated_rows_parse_and_normalise(seed: int, fmt: str) -> None:
    """500 rows per example through ``parse_row`` + ``normalise_pairs``: never an exception, a known
    reason or a well-formed pair of valid text, and the reason each hostile row must get."""
    for i, (text, tag) in enumerate(hostile_rows(seed, 500)):
        row, reason = parse_row(text)
        candidates = normalise_pairs(row, fmt) if not reason else [(None, reason)]
        assert candidates
        for out, why in candidates:
            assert_normalised(out, why)
        first = "" if any(out is not None for out, _ in candidates) else candidates[0][1]
        # Templates come later; a fixed format may drop a row of another shape before its surrogate is seen.
        if tag in ("deep", "dropped") or (tag == "surrogate" and fmt == "auto"):
            assert_reason(first, tag, "own", (seed, i))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), template=st.sampled_from(sorted(TEMPLATES)))
def test_generated_rows_through_tokenize_batch(tok, seed: int, template: str) -> None:
    """300 rows per example through the pipeline's own ``tokenize_batch`` (in-process, the tiny
    tokenizer) under templates that raise: one output row per input row (pair_index 0), each kept
    with token ids or dropped with a known reason, and the reason each hostile row must get."""
    rows = hostile_rows(seed, 300)
    batch = pa.table({"source": ["s"] * len(rows), "row_id": list(range(1, len(rows) + 1)),
                      "split": ["train"] * len(rows), "text": [text for text, _ in rows]})
    out = tokenize_batch(batch, model_path="tiny", gguf_file=None, settings=SETTINGS, eval_fraction=0.0, seed=0,
                         chat_template=TEMPLATES[template])
    first = [r for r in out.to_pylist() if r["pair_index"] == 0]
    assert [r["row_id"] for r in first] == list(range(1, len(rows) + 1))  # every row accounted for, once
    for r in out.to_pylist():
        if r["drop_reason"]:
            assert r["drop_reason"] in REASONS and not r["chosen_ids"]
        else:
            assert r["prompt_ids"] and r["chosen_ids"] and r["rejected_ids"]
            assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= SETTINGS.max_length
    for r, (_, tag) in zip(first, rows):
        assert_reason(r["drop_reason"], tag, template, (seed, r["row_id"]))
    reasons = Counter(r["drop_reason"] for r in first)
    assert reasons[TOO_DEEPLY_NESTED] == sum(tag == "deep" for _, tag in rows)


_ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), hostile_text())
_MESSAGES = st.lists(st.builds(lambda role, content: {"role": role, "content": content}, _ROLE, hostile_text()),
                     min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompt=_MESSAGES, chosen=_MESSAGES, rejected=_MESSAGES,
       template=st.sampled_from([*TEMPLATES.values(), PLAIN_CHAT_TEMPLATE]), tokenizer=st.sampled_from(["tiny", "bpe"]))
def test_tokenize_pair_never_raises(toks, prompt, chosen, rejected, template, tokenizer) -> None:
    """Any roles and contents (surrogates, NUL, huge, odd) under any template and tokenizer: a pair or a reason."""
    t = tokenize_pair(toks[tokenizer], prompt, chosen, rejected, SETTINGS, template)
    assert t.drop_reason in ("", *REASONS)
    texts = [m[k] for m in (*prompt, *chosen, *rejected) for k in ("role", "content")]
    if not all(map(is_valid_text, texts)):  # unless the template failed first
        assert t.drop_reason in (INVALID_UNICODE, TEMPLATE_ERROR)
    if not t.drop_reason:
        assert t.prompt_ids and t.chosen_ids and t.rejected_ids


# --- issue 26: giant rows, content parts and roles -----------------------------------------------


def _batch(texts: list[str]) -> pa.Table:
    return pa.table({"source": ["s"] * len(texts), "row_id": list(range(1, len(texts) + 1)),
                     "split": ["train"] * len(texts), "text": texts})


def _reasons(batch: pa.Table, settings: TokenizeSettings = SETTINGS) -> list[str]:
    out = tokenize_batch(batch, model_path="tiny", gguf_file=None, settings=settings, eval_fraction=0.0, seed=0)
    return [r["drop_reason"] for r in out.to_pylist() if r["pair_index"] == 0]


def test_size_bound_is_exact_in_utf8_bytes(monkeypatch) -> None:
    """A row of exactly ``max_row_bytes`` is parsed; one byte more is ``too_long``, unparsed (broken
    JSON past the bound is too_long, not unparseable). The 1 MiB floor is lowered here, so the bound is 256 x 96 bytes."""
    monkeypatch.setattr(tokenize, "MIN_ROW_BYTES", 4096)
    bound = SETTINGS.max_row_bytes
    assert bound == tokenize.ROW_BYTES_PER_TOKEN * SETTINGS.max_length == 24_576

    def row(size: int, char: str = "x") -> str:
        head = json.dumps({"prompt": "q", "chosen": "a", "rejected": ""})[:-2]  # ... "rejected": "
        body = char * ((size - len(head.encode()) - 2) // len(char.encode()))
        text = head + body + '"}'
        assert len(text.encode()) == size, (len(text.encode()), size)
        return text

    texts = [row(bound), row(bound + 1), row(bound + 2, "é"), row(bound, "é"), "{" * (bound + 1)]
    assert _reasons(_batch(texts)) == ["", TOO_LONG, TOO_LONG, "", TOO_LONG]


def test_a_50_mb_row_is_never_made_a_python_string() -> None:
    """The issue's 50 MB row: dropped as too_long in well under a second, and the text never
    becomes a Python string (Python's own allocations stay under 5 MB; tokenizing it took 10-25 GB)."""
    import time
    import tracemalloc

    giant = json.dumps({"prompt": "q", "chosen": "x" * 50_000_000, "rejected": "y"})
    batch = _batch([giant, json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})])
    tokenize_batch(batch.slice(1), model_path="tiny", gguf_file=None, settings=SETTINGS, eval_fraction=0.0, seed=0)  # load the tokenizer
    del giant
    tracemalloc.start()
    started = time.monotonic()
    try:
        reasons = _reasons(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reasons == [TOO_LONG, ""]
    assert peak < 5_000_000, peak
    assert time.monotonic() - started < 5


def test_hostile_row_shapes_through_tokenize_batch() -> None:
    """Each kind of the issue through the pipeline's own function, with the reason it must get."""
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    cases = [
        ({"prompt": [{"role": "user", "content": [text("2+"), text("2?")]}], "chosen": "4", "rejected": "5"}, ""),
        ({"prompt": [{"role": "user", "content": [image]}], "chosen": "4", "rejected": "5"}, NON_TEXT_CONTENT),
        ({"prompt": [{"role": "user", "content": [text("what is"), image]}], "chosen": "a cat", "rejected": "a dog"}, NON_TEXT_CONTENT),
        ({"prompt": "q", "chosen": [{"role": "assistant", "content": None}], "rejected": "5"}, "missing_field"),
        ({"prompt": "q", "chosen": [{"role": "assistant", "content": {"text": "4"}}], "rejected": "5"}, UNPARSEABLE),
        ({"prompt": [{"role": "Wizard", "content": "q"}], "chosen": "4", "rejected": "5"}, UNKNOWN_ROLE),
        ({"prompt": "q", "chosen": [{"role": "wizard", "content": "4"}], "rejected": "5"}, UNKNOWN_ROLE),
        ({"prompt": [{"role": "tool", "content": "42"}, {"role": "user", "content": "q"}], "chosen": "4", "rejected": "5"}, UNKNOWN_ROLE),
        ({"prompt": [{"role": "USER", "content": "q"}], "chosen": [{"role": "Assistant", "content": "4"}], "rejected": "5"}, ""),
        ({"prompt": [{"from": "human", "value": "q"}], "chosen": [{"from": "gpt", "value": "4"}], "rejected": "5"}, ""),
        ({"prompt": [{"content": "q"}], "chosen": "4", "rejected": "5"}, "missing_field"),
        ({"prompt": ["q"], "chosen": "4", "rejected": "5"}, UNPARSEABLE),
        ({"prompt": [{"role": "user", "content": "q"}] * 100_000, "chosen": "4", "rejected": "5"}, TOO_LONG),  # 3.4 MB
        ({"prompt": [{"role": "user", "content": "q"}] * 1_000, "chosen": "4", "rejected": "5"}, ""),
    ]
    # Nesting within the parser's stack, as a content: unparseable; past it: too_deeply_nested.
    texts = [json.dumps(row) for row, _ in cases] + [
        '{"prompt": [{"role": "user", "content": ' + "[" * 500 + "]" * 500 + '}], "chosen": "a", "rejected": "b"}',
        '{"prompt": [{"role": "user", "content": ' + "[" * 50_000 + "]" * 50_000 + '}], "chosen": "a", "rejected": "b"}']
    want = [reason for _, reason in cases] + [UNPARSEABLE, TOO_DEEPLY_NESTED]
    assert _reasons(_batch(texts), TokenizeSettings(4096, 2048)) == want


_PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=5)),
    st.sampled_from([{"type": "image_url", "image_url": {"url": "x"}}, {"type": "image"}, {"type": "input_audio"},
                     {"type": "text"}, {"type": "text", "text": 3}, {"text": "t"}, {"type": None}, "part", 3, None, []]),
)
_CONTENT = st.one_of(st.text(max_size=8), st.lists(_PART, max_size=3), st.sampled_from([None, 3, 2.5, True, {}, {"type": "text", "text": "x"}]))
_ANY_ROLE = st.one_of(st.sampled_from(["user", "User", " ASSISTANT ", "system", "human", "gpt", "model", "developer",
                                       "tool", "function", "Wizard", "", None, 3]), st.text(max_size=6))
_MESSAGE = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, _ANY_ROLE, _CONTENT),
    st.builds(lambda r, c: {"from": r, "value": c}, _ANY_ROLE, _CONTENT),
    st.sampled_from([None, "text", 3, [], {}]),
)


@settings(max_examples=300, deadline=None)
@given(prompt=st.lists(_MESSAGE, max_size=3), chosen=st.lists(_MESSAGE, max_size=2), rejected=st.lists(_MESSAGE, max_size=2),
       sharegpt=st.booleans())
def test_generated_message_shapes(prompt, chosen, rejected, sharegpt) -> None:
    """Any roles and contents in any shape: a known reason, or a pair whose roles are the three
    standard ones and whose contents are strings; a row holding a non-text part is never kept."""
    if sharegpt:
        row = {"conversations": prompt, "chosen": chosen[0] if chosen else None, "rejected": rejected[0] if rejected else None}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out, reason = normalise(json.loads(json.dumps(row)))
    assert_normalised(out, reason)
    if out is not None:
        assert {m["role"] for k in out for m in out[k]} <= {"system", "user", "assistant"}
        parts = [p for m in json.loads(json.dumps(row))["conversations" if sharegpt else "prompt"] if isinstance(m, dict)
                 for p in (m.get("content", m.get("value")) if isinstance(m.get("content", m.get("value")), list) else [])]
        assert all(isinstance(p, dict) and p.get("type") == "text" for p in parts)
