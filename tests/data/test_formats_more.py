"""Tests of the newer row handling in ``raydpo.data.formats``: ShareGPT rows, column mapping,
``detect_format``, and a fixed ``fmt`` that drops rows of other shapes. No Ray. (Ranked rows:
test_ranked.py.)"""
from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydpo.config import ConfigError, DataConfig, load_config
from raydpo.data.formats import (
    COLUMN_TARGETS,
    COMPLETION_ROLE,
    EMPTY,
    FORMATS,
    INVALID_UNICODE,
    MISSING_FIELD,
    NON_TEXT_CONTENT,
    RANKED_PAIRS,
    REASONS,
    UNKNOWN_ROLE,
    UNPARSEABLE,
    apply_columns,
    detect_format,
    detect_formats,
    normalise,
    normalise_pairs,
    parse_message,
)
from tests.data.checks import assert_normalised, hostile_text

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def msg(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


def sg(frm: str, text: str) -> dict[str, str]:
    return {"from": frm, "value": text}


HH = "\n\nHuman: Name a fruit.\n\nAssistant:"
ROWS = {
    "standard": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "conversational": {"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},
    "implicit_prompt": {"chosen": HH + " Banana.", "rejected": HH + " No."},
    "sharegpt": {"conversations": [sg("human", "2+2?")], "chosen": sg("gpt", "4"), "rejected": sg("gpt", "5")},
    "ranked": {"prompt": "2+2?", "completions": ["5", "4", "22"], "scores": [3, 9, 1]},
}


# --- messages: content parts and roles (issue 26) -----------------------------------------------


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def conv(prompt: object = None, chosen: object = None, rejected: object = None) -> dict:
    """A conversational row with the given messages (each a message, or a list of them) in place of the good ones."""
    row = {"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]}
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None:
            row[key] = value if isinstance(value, list) else [value]
    return row


def test_content_parts_become_their_text_joined() -> None:
    """OpenAI-style / Hugging Face multimodal content: the text parts, joined with nothing between
    them (as HF chat templates render them); the Responses API's input_text/output_text too."""
    row = conv({"role": "user", "content": [text("2+"), text("2?")]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
               {"role": "assistant", "content": [{"type": "input_text", "text": "5"}, text("!")]})
    assert normalise(row) == ({"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
                               "rejected": [msg("assistant", "5!")]}, "")
    # ShareGPT values and ranked completions read parts the same way.
    assert normalise(dict(ROWS["sharegpt"], chosen={"from": "gpt", "value": [text("4")]}))[1] == ""
    ranked = {"prompt": "2+2?", "completions": [[{"role": "assistant", "content": [text("4")]}], "5"], "scores": [2, 1]}
    assert normalise(ranked)[0]["chosen"] == [msg("assistant", "4")]


@pytest.mark.parametrize(("content", "reason"), [
    ([IMAGE], NON_TEXT_CONTENT),  # an image alone: no text at all
    ([text("What is in"), IMAGE, text("this picture?")], NON_TEXT_CONTENT),  # text + image: not the text alone
    ([{"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}], NON_TEXT_CONTENT),
    ([{"type": "image", "image": "cat.png"}], NON_TEXT_CONTENT),  # HF's multimodal shape
    ([], EMPTY),  # no parts: no content
    ([text("a"), "b"], UNPARSEABLE),  # a part that is not a dict
    ([{"text": "a"}], UNPARSEABLE),  # a part without a type
    ([{"type": "text", "text": 3}], UNPARSEABLE),
    ([{"type": "text"}], UNPARSEABLE),
    ([[text("a")]], UNPARSEABLE),  # nested lists
    (None, MISSING_FIELD),  # content: null, as absent
    (3, UNPARSEABLE),
    (2.5, UNPARSEABLE),
    (True, UNPARSEABLE),
    ({"type": "text", "text": "a"}, UNPARSEABLE),  # one part, not in a list
])
@pytest.mark.parametrize("where", ["prompt", "chosen", "rejected"])
def test_content_that_is_not_text(content: object, reason: str, where: str) -> None:
    role = "user" if where == "prompt" else "assistant"
    assert normalise(conv(**{where: {"role": role, "content": content}})) == (None, reason)
    # In a fixed format and in a ShareGPT row, the same reason.
    assert normalise(conv(**{where: {"role": role, "content": content}}), "conversational") == (None, reason)
    sharegpt = dict(ROWS["sharegpt"])
    if where == "prompt":
        sharegpt["conversations"] = [{"from": "human", "value": content}]
    else:
        sharegpt[where] = {"from": "gpt", "value": content}
    assert normalise(sharegpt) == (None, reason)


def test_tool_calls_are_non_text_content() -> None:
    """An assistant turn that calls a tool (content null or text beside the call): the call would be lost."""
    call = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    prompt = [msg("user", "2+2?"), {"role": "assistant", "content": None, "tool_calls": call}, msg("user", "so?")]
    assert normalise(conv(prompt)) == (None, NON_TEXT_CONTENT)
    assert normalise(conv(chosen={"role": "assistant", "content": "4", "tool_calls": call})) == (None, NON_TEXT_CONTENT)
    assert normalise(conv(chosen={"role": "assistant", "content": None, "function_call": {"name": "add"}})) == (None, NON_TEXT_CONTENT)
    assert normalise(conv(chosen={"role": "assistant", "content": "4", "tool_calls": []}))[1] == ""  # no call made


@pytest.mark.parametrize("role", ["Wizard", "tool", "function", "ipython", "observation", "", " ", "usr", "assistant:", "user assistant"])
@pytest.mark.parametrize("where", ["prompt", "chosen", "rejected"])
def test_unknown_role_anywhere(role: str, where: str) -> None:
    """Never rendered as a made-up speaker, never blamed on the template: ``unknown_role``."""
    assert normalise(conv(**{where: msg(role, "x")})) == (None, UNKNOWN_ROLE)
    sharegpt = dict(ROWS["sharegpt"])
    if where == "prompt":
        sharegpt["conversations"] = [sg("human", "2+2?"), sg(role, "x")]
    else:
        sharegpt[where] = sg(role, "x")
    assert normalise(sharegpt) == (None, UNKNOWN_ROLE)
    ranked = {"prompt": [msg("user", "q")], "completions": [[msg(role, "x")], "b"], "scores": [2, 1]}
    assert normalise(ranked if where != "prompt" else dict(ranked, prompt=[msg(role, "q")], completions=["a", "b"])) == (None, UNKNOWN_ROLE)


@pytest.mark.parametrize(("role", "as_"), [
    ("User", "user"), (" USER ", "user"), ("human", "user"), ("Human", "user"),
    ("system", "system"), ("System", "system"), ("developer", "system"),
    ("Assistant", "assistant"), ("gpt", "assistant"), ("GPT", "assistant"), ("model", "assistant"),
])
def test_known_roles_in_any_casing_and_alias(role: str, as_: str) -> None:
    assert parse_message(msg(role, "x")) == (msg(as_, "x"), "")
    assert parse_message(sg(role, "x")) == (msg(as_, "x"), "")
    if as_ != "assistant":
        out, reason = normalise(conv([msg(role, "x"), msg("user", "q")]))
        assert reason == "" and out["prompt"][0] == msg(as_, "x")


@pytest.mark.parametrize(("message", "reason"), [
    ("a string", UNPARSEABLE), (None, UNPARSEABLE), (3, UNPARSEABLE), ([msg("user", "x")], UNPARSEABLE),
    ({"content": "x"}, MISSING_FIELD), ({"role": None, "content": "x"}, MISSING_FIELD), ({"role": "user"}, MISSING_FIELD),
    ({"from": "human"}, MISSING_FIELD), ({}, MISSING_FIELD),
    ({"role": 1, "content": "x"}, UNPARSEABLE), ({"role": ["user"], "content": "x"}, UNPARSEABLE),
    ({"role": "us\ud800er", "content": "x"}, INVALID_UNICODE),
])
def test_malformed_messages(message: object, reason: str) -> None:
    assert parse_message(message) == (None, reason)
    assert normalise(conv([msg("user", "q"), message])) == (None, reason)


def test_completion_must_start_with_the_assistant_turn() -> None:
    assert normalise(conv(chosen=msg("user", "4"))) == (None, COMPLETION_ROLE)
    assert normalise(conv(rejected=[msg("system", "x"), msg("assistant", "5")])) == (None, COMPLETION_ROLE)
    assert normalise(dict(ROWS["sharegpt"], rejected=sg("human", "5"))) == (None, COMPLETION_ROLE)
    # A multi-turn completion that starts with the assistant's turn is a completion.
    assert normalise(conv(chosen=[msg("assistant", "4"), msg("user", "sure?"), msg("assistant", "yes")]))[1] == ""


def test_many_messages_and_sharegpt_keys_in_a_message_list() -> None:
    prompt = [msg("user" if i % 2 == 0 else "assistant", f"t{i}") for i in range(100_001)]
    out, reason = normalise(conv(prompt))
    assert reason == "" and len(out["prompt"]) == 100_001
    # {from, value} messages inside a TRL message list (and {role, content} inside ShareGPT's conversations).
    assert normalise(conv([sg("human", "2+2?")]))[0] == normalise(ROWS["conversational"])[0]
    assert normalise(dict(ROWS["sharegpt"], conversations=[msg("user", "2+2?")]))[0] == normalise(ROWS["sharegpt"])[0]


def test_every_reason_is_listed_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in readme] == []


# --- ShareGPT ---------------------------------------------------------------------------------


def test_sharegpt_single_turn() -> None:
    assert normalise(ROWS["sharegpt"]) == (
        {"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},
        "",
    )


def test_sharegpt_system_becomes_a_leading_message() -> None:
    row = dict(ROWS["sharegpt"], system="Be brief.")
    out, reason = normalise(row)
    assert reason == ""
    assert out["prompt"] == [msg("system", "Be brief."), msg("user", "2+2?")]


@pytest.mark.parametrize("system", ["", "   ", None])
def test_sharegpt_blank_system_adds_nothing(system: str | None) -> None:
    out, _ = normalise(dict(ROWS["sharegpt"], system=system))
    assert out["prompt"] == [msg("user", "2+2?")]


def test_sharegpt_multi_turn_and_role_names() -> None:
    row = {
        "conversations": [sg("system", "S"), sg("human", "a"), sg("gpt", "b"), sg("user", "c"), sg("model", "d"), sg("Human", "e")],
        "chosen": sg("assistant", "good"),
        "rejected": sg("model", "bad"),
    }
    out, reason = normalise(row)
    assert reason == ""
    assert out == {
        "prompt": [msg("system", "S"), msg("user", "a"), msg("assistant", "b"), msg("user", "c"),
                   msg("assistant", "d"), msg("user", "e")],
        "chosen": [msg("assistant", "good")],
        "rejected": [msg("assistant", "bad")],
    }


@pytest.mark.parametrize(
    "row",
    [
        # Wrong types.
        dict(ROWS["sharegpt"], conversations="2+2?"),
        dict(ROWS["sharegpt"], conversations=[sg("human", "a"), 3]),
        dict(ROWS["sharegpt"], chosen={"from": "gpt", "value": 4}),
        dict(ROWS["sharegpt"], system=["Be brief."]),
    ],
)
def test_sharegpt_unparseable(row: dict) -> None:
    assert normalise(row) == (None, UNPARSEABLE)
    assert normalise(row, "sharegpt") == (None, UNPARSEABLE)


def test_sharegpt_empty_conversations_is_empty() -> None:
    assert normalise(dict(ROWS["sharegpt"], conversations=[])) == (None, EMPTY)


def test_sharegpt_missing_completion() -> None:
    row = {k: v for k, v in ROWS["sharegpt"].items() if k != "rejected"}
    assert normalise(row) == (None, MISSING_FIELD)
    assert normalise(row, "sharegpt") == (None, MISSING_FIELD)


# --- column mapping ---------------------------------------------------------------------------

SE_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}


def test_columns_rename_stack_exchange_style() -> None:
    row = {"qid": 1, "question": "2+2?", "response_j": "4", "response_k": "5"}
    assert apply_columns(row, SE_COLUMNS) == {"qid": 1, "prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert normalise(row, columns=SE_COLUMNS) == normalise(ROWS["standard"])
    assert normalise(row) == (None, MISSING_FIELD)  # without the mapping


def test_columns_for_sharegpt_fields() -> None:
    columns = {"conversations": "messages", "system": "sys", "chosen": "good", "rejected": "bad"}
    row = {"messages": [sg("human", "q")], "sys": "S", "good": sg("gpt", "a"), "bad": sg("gpt", "b")}
    out, reason = normalise(row, "sharegpt", columns)
    assert reason == ""
    assert out["prompt"] == [msg("system", "S"), msg("user", "q")]


def test_columns_swap_and_absent_source() -> None:
    swap = {"chosen": "rejected", "rejected": "chosen"}
    out, _ = normalise(ROWS["standard"], columns=swap)
    assert out["chosen"] == [msg("assistant", "5")] and out["rejected"] == [msg("assistant", "4")]
    # A mapped field comes only from its source column: an unmapped "prompt" left in the row is not used.
    row = dict(ROWS["standard"], response_j="4", response_k="5")
    assert apply_columns(row, SE_COLUMNS) == {"chosen": "4", "rejected": "5"}
    assert normalise(row, "standard", SE_COLUMNS) == (None, MISSING_FIELD)


def test_columns_leave_non_dict_rows_alone() -> None:
    assert apply_columns([1, 2], SE_COLUMNS) == [1, 2]
    assert normalise("text", columns=SE_COLUMNS) == (None, UNPARSEABLE)
    assert apply_columns(ROWS["standard"], None) is ROWS["standard"]


# --- detect_format and a fixed format ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_known_shapes(fmt: str) -> None:
    assert detect_format(ROWS[fmt]) == fmt
    assert normalise(ROWS[fmt], fmt)[1] == ""
    assert normalise(ROWS[fmt], fmt) == normalise(ROWS[fmt], "auto")


def test_detect_format_ultrafeedback_and_mixed_are_conversational() -> None:
    row = {"prompt": "q", "chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "q"), msg("assistant", "b")]}
    assert detect_format(row) == "conversational"


@pytest.mark.parametrize(
    "row",
    [None, 42, "text", [1], {}, {"question": "q"}, {"prompt": "q", "chosen": "a"}, {"prompt": 5, "chosen": "a", "rejected": "b"},
     {"chosen": 3, "rejected": 4}, {"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     {"conversations": [sg("human", "q")], "chosen": "a", "rejected": None},
     {"conversations": [sg("human", "q")], "chosen": sg("gpt", "a"), "rejected": [sg("gpt", "b")]}],
)
def test_detect_format_junk(row: object) -> None:
    assert detect_format(row) is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("other", FORMATS)
def test_fixed_format_drops_other_shapes(fmt: str, other: str) -> None:
    out, reason = normalise(ROWS[other], fmt)
    if fmt == other:
        assert reason == ""
        return
    assert out is None
    # A field the format needs is absent: missing_field; all present but the wrong shape: unparseable.
    expected = {
        ("standard", "conversational"): UNPARSEABLE,
        ("standard", "implicit_prompt"): MISSING_FIELD,
        ("standard", "sharegpt"): MISSING_FIELD,
        ("conversational", "standard"): UNPARSEABLE,
        ("conversational", "implicit_prompt"): MISSING_FIELD,
        ("conversational", "sharegpt"): MISSING_FIELD,
        ("implicit_prompt", "standard"): UNPARSEABLE,  # a prompt beside the strings is another shape
        ("implicit_prompt", "conversational"): UNPARSEABLE,
        ("implicit_prompt", "sharegpt"): UNPARSEABLE,
        ("sharegpt", "standard"): MISSING_FIELD,
        ("sharegpt", "conversational"): MISSING_FIELD,
        ("sharegpt", "implicit_prompt"): MISSING_FIELD,
        # Ranked rows lack chosen/rejected; pair rows lack completions/scores.
        **{(f, "ranked"): MISSING_FIELD for f in FORMATS},
        **{("ranked", f): MISSING_FIELD for f in FORMATS},
    }[(fmt, other)]
    assert reason == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_format_wrong_types_and_non_dicts(fmt: str) -> None:
    assert normalise(None, fmt) == (None, UNPARSEABLE)
    assert normalise([ROWS[fmt]], fmt) == (None, UNPARSEABLE)
    wrong = {"prompt": 1, "chosen": 2, "rejected": 3, "conversations": 4, "completions": 5, "scores": 6}
    assert normalise(wrong, fmt) == (None, UNPARSEABLE)


def test_unknown_fmt_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        normalise(ROWS["standard"], "jsonl")


# --- config -----------------------------------------------------------------------------------


def _write(tmp_path: Path, **data: object) -> Path:
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["data"].update(data)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_config_format_literal_matches_formats() -> None:
    assert typing.get_args(DataConfig.model_fields["format"].annotation) == ("auto", *FORMATS)


def test_config_columns_and_format_load(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, columns=SE_COLUMNS, format="standard"))
    assert cfg.data.columns == SE_COLUMNS and cfg.data.format == "standard"
    defaults = load_config(QUICKSTART)
    assert defaults.data.columns is None and defaults.data.format == "auto"


def test_config_unknown_column_target_names_data_columns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, columns={"bogus": "x"}))
    assert "data.columns" in str(e.value) and "bogus" in str(e.value)
    for target in COLUMN_TARGETS:
        load_config(_write(tmp_path, columns={target: "x"}))


def test_config_unknown_format_names_data_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path), ["data.format=jsonl"])
    assert "data.format" in str(e.value)


# --- fuzzing ----------------------------------------------------------------------------------

_KEYS = st.sampled_from(["prompt", "chosen", "rejected", "conversations", "system", "from", "value", "role", "content",
                         "question", "response_j", "response_k", "completions", "responses", "scores", "ratings"])
_TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["human", "gpt", "system", "model", "robot", "\n\nHuman: q\n\nAssistant:", ""]),
                  hostile_text())
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _TEXT)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_KEYS | st.text(max_size=4), children, max_size=4)),
    max_leaves=15,
)
_SG = st.fixed_dictionaries({"from": st.one_of(_TEXT, _JSON), "value": st.one_of(_TEXT, _JSON)})
_FIELD = st.one_of(_JSON, _SG, st.lists(_SG, max_size=3))
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": _TEXT}),
                     max_size=3)
_SCORE = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(), _TEXT)
_ROWS = st.one_of(
    _JSON,
    st.dictionaries(_KEYS, _FIELD, max_size=5),
    st.fixed_dictionaries({"conversations": st.lists(_SG, max_size=3), "chosen": _SG, "rejected": _SG},
                          optional={"system": st.one_of(_TEXT, _JSON)}),
    # Ranked rows: mostly well-typed, with junk completions, bad scores, length mismatches, extra fields.
    st.builds(
        lambda prompt, comp_key, comps, score_key, scores, extra: {"prompt": prompt, comp_key: comps, score_key: scores, **extra},
        st.one_of(_TEXT, _MESSAGES, _JSON),
        st.sampled_from(["completions", "responses"]),
        st.lists(st.one_of(_TEXT, _TEXT, _MESSAGES, _JSON), max_size=5),
        st.sampled_from(["scores", "ratings"]),
        st.lists(st.one_of(st.integers(-3, 3), st.integers(-3, 3), _SCORE), max_size=5),
        st.dictionaries(st.sampled_from(["chosen", "rejected", "completions", "scores"]), _FIELD, max_size=2),
    ),
)
_COLUMNS = st.one_of(st.none(), st.dictionaries(st.sampled_from(COLUMN_TARGETS), _KEYS, max_size=3))
_RANKED = st.tuples(st.sampled_from(RANKED_PAIRS), st.sampled_from([0.0, 0.5, 2.0]))




@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_ROWS, st.sampled_from(("auto", *FORMATS)), _COLUMNS, _RANKED)
def test_fuzz_never_raises_for_every_format(row: object, fmt: str, columns: dict[str, str] | None,
                                            ranked: tuple[str, float]) -> None:
    mode, margin = ranked
    candidates = normalise_pairs(row, fmt, columns, ranked_pairs=mode, min_score_margin=margin)
    assert candidates
    for out, reason in candidates:
        assert_normalised(out, reason)
    shapes = detect_formats(apply_columns(row, columns))
    if any(out is not None for out, _ in candidates):
        assert fmt in shapes if fmt != "auto" else len(shapes) == 1
    if len(candidates) > 1:  # only ranked rows with all_margin give several pairs
        assert mode == "all_margin" and "ranked" in shapes
    assert normalise(row, fmt, columns, ranked_pairs=mode, min_score_margin=margin) == next(
        (c for c in candidates if c[0] is not None), candidates[0])


# --- plumbing: tokenize_batch passes columns and fmt to normalise (no Ray started) -------------


def test_tokenize_batch_applies_columns_and_format(tmp_path: Path) -> None:
    import json

    import pyarrow as pa

    from raydpo.data.pipeline import tokenize_batch
    from raydpo.data.tokenize import TokenizeSettings
    from raydpo.models import write_tiny

    model_dir = write_tiny(tmp_path / "m")
    rows = [{"question": "2+2?", "response_j": "4", "response_k": "5"}, ROWS["sharegpt"], ROWS["implicit_prompt"]]
    batch = pa.table({"source": ["s"] * 3, "row_id": [1, 2, 3], "split": ["train"] * 3, "text": [json.dumps(r) for r in rows]})
    kw = dict(model_path=str(model_dir), gguf_file=None, settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0)
    reasons = lambda **more: tokenize_batch(batch, **kw, **more)["drop_reason"].to_pylist()
    assert reasons() == [MISSING_FIELD, "", ""]
    # A mapped field comes only from its source: rows without response_j/response_k lose chosen/rejected.
    assert reasons(columns=SE_COLUMNS) == ["", MISSING_FIELD, MISSING_FIELD]
    assert reasons(columns=SE_COLUMNS, fmt="standard") == ["", MISSING_FIELD, MISSING_FIELD]
    assert reasons(fmt="sharegpt") == [MISSING_FIELD, "", MISSING_FIELD]
