"""Every known row shape -> one schema ``{prompt, chosen, rejected}`` of chat messages.

``parse_row(text)`` turns a record's JSON text into a row, and ``normalise(row)`` returns the
normalised row or a drop reason; neither raises on bad input, whatever its types or nesting.
Shapes: TRL standard (strings), TRL conversational (message lists; ``prompt`` may be a string and
``chosen``/``rejected`` whole conversations, as UltraFeedback-binarized), implicit-prompt
dialogues (Anthropic HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), and ShareGPT
(LLaMA-Factory: ``{conversations: [{from, value}, ...], chosen: {from, value}, rejected: {from, value}}``,
optionally ``system``), and ranked rows (``{prompt, completions|responses: [...], scores|ratings: [...]}``,
each completion a string or a message list, which become pairs: see ``ranked_pairs``).

Messages (``parse_message``), in every shape that has them: ``{role, content}`` or ShareGPT's
``{from, value}``. A role is matched without case or surrounding space, and ShareGPT's and
Gemma's names are the standard ones (``human`` -> ``user``; ``gpt``, ``model`` -> ``assistant``;
OpenAI's ``developer`` -> ``system``); any other role (``tool``, ``function``, ``Wizard``) is
``unknown_role``: raydpo carries no tool calls, and a made-up speaker is never rendered. The
content is a string or, as in OpenAI-style and Hugging Face multimodal chat data, a list of parts
``[{"type": "text", "text": ...}, ...]``: its text parts are joined with nothing between them, as
Hugging Face chat templates render a list of text parts; a part of any other type (``image``,
``image_url``, ``input_audio``, ...) drops the row as ``non_text_content`` rather than silently
training on the text without it, and so do tool calls. A completion must start with the assistant's
turn (``completion_role``).

``normalise(row, fmt, columns)``: ``columns`` (target -> source column) renames fields first;
``fmt`` is ``"auto"`` (``detect_format`` per row) or one of ``FORMATS``, which drops rows of any other
shape: ``missing_field`` when a field of the format is absent, ``unparseable`` otherwise.
``normalise_pairs`` is the general form: one row -> one or more candidate pairs, each kept or with its
reason (only ranked rows give more than one). ``source_format`` picks one shape for a whole source
from its first rows, and fails on a source of unknown or ambiguous shape.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

Message = dict[str, str]

MISSING_FIELD = "missing_field"
EMPTY = "empty"
IDENTICAL = "identical"
NO_COMMON_PREFIX = "no_common_prefix"
UNPARSEABLE = "unparseable"
TOO_LONG = "too_long"
TEMPLATE_MISMATCH = "template_mismatch"
BAD_SCORE = "bad_score"  # a ranked row's score is None, NaN, infinite or not a number
NO_PAIR = "no_pair"  # a ranked row whose scores give no pair (all tied, or no gap reaches the margin)
INVALID_UNICODE = "invalid_unicode"  # a message holds a lone surrogate (JSON "\ud800"): no character at all
TOO_DEEPLY_NESTED = "too_deeply_nested"  # JSON nested deeper than the parser's stack (RecursionError)
TEMPLATE_ERROR = "template_error"  # the chat template failed on the row (e.g. its raise_exception)
UNKNOWN_ROLE = "unknown_role"  # a message's role is none of system, user, assistant (or their aliases)
NON_TEXT_CONTENT = "non_text_content"  # a content part that is not text (an image, audio, ...) or a tool call
COMPLETION_ROLE = "completion_role"  # a completion (chosen/rejected) does not start with the assistant's turn
# Every drop reason, in the order the README lists them. ``too_long`` is both a row past the size
# bound (``tokenize.TokenizeSettings.max_row_bytes``) and a pair with no completion token left in the
# length budget.
REASONS = (MISSING_FIELD, EMPTY, IDENTICAL, NO_COMMON_PREFIX, UNPARSEABLE, TOO_LONG, TEMPLATE_MISMATCH,
           BAD_SCORE, NO_PAIR, INVALID_UNICODE, TOO_DEEPLY_NESTED, TEMPLATE_ERROR, UNKNOWN_ROLE,
           NON_TEXT_CONTENT, COMPLETION_ROLE)

FORMATS = ("standard", "conversational", "implicit_prompt", "sharegpt", "ranked")
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "conversations", "system", "completions", "scores")
# How scored completions become pairs, for ranked rows (data.ranked_pairs) and scored online samples
# (online.pairs) alike: see score_pairs.
PairRule = Literal["best_worst", "all_margin"]
RANKED_PAIRS: tuple[str, ...] = get_args(PairRule)
# Ranked rows name their lists either way; the first name present wins.
_COMPLETIONS = ("completions", "responses")
_SCORES = ("scores", "ratings")
# The fields each fixed format needs; one absent (or null) is ``missing_field``.
_REQUIRED = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "ranked": ("prompt", "completions", "scores"),  # completions|responses, scores|ratings
}
# Every role name raydpo reads (lower case, stripped) -> the role it renders: the standard three,
# ShareGPT's (human, gpt), Gemma's (model) and OpenAI's developer (its name for the system turn).
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant"}
# Part types whose ``text`` is the message's text: chat completions' "text", the Responses API's
# "input_text" / "output_text". Any other type is not text (image, image_url, input_audio, file, ...).
_TEXT_PARTS = ("text", "input_text", "output_text")

_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT = "\n\nAssistant:"


def parse_row(text: str) -> tuple[Any, str]:
    """One record's JSON text -> ``(value, "")``, or ``(None, reason)`` where it does not parse:
    ``too_deeply_nested`` (the parser ran out of stack: a ``RecursionError``, not a ``ValueError``)
    or ``unparseable`` (bad JSON; also an integer of more than 4300 digits)."""
    try:
        return json.loads(text), ""
    except RecursionError:
        return None, TOO_DEEPLY_NESTED
    except ValueError:
        return None, UNPARSEABLE


def is_valid_text(text: str) -> bool:
    """False where ``text`` holds a lone surrogate (U+D800-U+DFFF, which JSON's ``"\\ud800"`` escape
    and ``surrogateescape`` can produce): it is no character, UTF-8 cannot encode it, and tokenizers
    reject it with a ``TypeError``. Such text is dropped, never silently replaced."""
    if text.isascii():  # the common case, without a copy
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Drop(Exception):
    """A message that cannot be used; ``reason`` is the row's drop reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _content(value: Any) -> str:
    """A message's content as text: a string, or the text of a list of parts; raises ``_Drop`` for
    a list of no parts (``empty``), a part that is not text (``non_text_content``), a malformed part
    or any other value (``unparseable``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _Drop(UNPARSEABLE)
    if not value:
        raise _Drop(EMPTY)
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _Drop(UNPARSEABLE)
        if kind not in _TEXT_PARTS:
            raise _Drop(NON_TEXT_CONTENT)
        if not isinstance(part.get("text"), str):
            raise _Drop(UNPARSEABLE)
        texts.append(part["text"])
    return "".join(texts)  # as Hugging Face chat templates render text parts: nothing between them


def _message(value: Any) -> Message:
    """``{role, content}`` or ShareGPT's ``{from, value}`` -> a message of a known role and text
    content (see the module doc); raises ``_Drop`` with the reason: ``unparseable`` (not a dict, a
    role or content of the wrong type), ``missing_field`` (no role or content, or null),
    ``invalid_unicode`` (a lone surrogate in the role), ``unknown_role``, ``non_text_content``."""
    if not isinstance(value, dict):
        raise _Drop(UNPARSEABLE)
    role_key, content_key = ("role", "content") if "role" in value or "from" not in value else ("from", "value")
    role, content = value.get(role_key), value.get(content_key)
    if value.get("tool_calls") or value.get("function_call"):
        raise _Drop(NON_TEXT_CONTENT)  # an assistant's tool call: no text of ours can stand for it
    if role is None or content is None:
        raise _Drop(MISSING_FIELD)
    if not isinstance(role, str):
        raise _Drop(UNPARSEABLE)
    if not is_valid_text(role):
        raise _Drop(INVALID_UNICODE)
    known = _ROLES.get(role.strip().lower())
    if known is None:
        raise _Drop(UNKNOWN_ROLE)
    return {"role": known, "content": _content(content)}


def parse_message(value: Any) -> tuple[Message | None, str]:
    """One message -> ``(message, "")`` or ``(None, reason)``: see ``_message`` and the module doc."""
    try:
        return _message(value), ""
    except _Drop as d:
        return None, d.reason


def _messages(value: Any, default_role: str) -> list[Message]:
    """A string becomes one message of ``default_role``; a list must hold messages (``_message``).
    Raises ``_Drop``: ``unparseable`` for any other value, else the first bad message's reason."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise _Drop(UNPARSEABLE)
    return [_message(m) for m in value]


def hh_transcript(text: str) -> list[Message] | None:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> messages; None where it has no turn markers."""
    parts: list[Message] = []
    rest = text
    marker_positions = []
    for name in _HH_ROLES:
        start = 0
        while (i := rest.find(f"\n\n{name}:", start)) >= 0:
            marker_positions.append((i, name))
            start = i + 1
    if not marker_positions:
        return None
    marker_positions.sort()
    for k, (i, name) in enumerate(marker_positions):
        body_start = i + len(f"\n\n{name}:")
        end = marker_positions[k + 1][0] if k + 1 < len(marker_positions) else len(rest)
        parts.append({"role": _HH_ROLES[name], "content": rest[body_start:end].strip()})
    return parts


def _split_implicit(chosen: str, rejected: str) -> tuple[list[Message], list[Message], list[Message]] | str:
    """Split two dialogues at the last common ``"\\n\\nAssistant:"``; return the three parts or a reason."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)  # the last marker lying wholly inside the common prefix
    if cut < 0:
        return NO_COMMON_PREFIX
    cut += len(_ASSISTANT)
    prompt = hh_transcript(chosen[:cut])
    if not prompt:
        return NO_COMMON_PREFIX
    if prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
        prompt = prompt[:-1]  # the open "Assistant:" turn is what the completions fill
    return (
        prompt,
        [{"role": "assistant", "content": chosen[cut:].strip()}],
        [{"role": "assistant", "content": rejected[cut:].strip()}],
    )


def apply_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """Rename fields: ``columns`` maps a target field (``prompt``, ...) to the row's source column.
    A mapped target comes only from its source: where the source is absent, so is the target. Other
    fields pass through; a row that is not a dict is returned as is."""
    if not columns or not isinstance(row, dict):
        return row
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources}
    for target, source in columns.items():
        if source in row:
            out[target] = row[source]
        else:
            out.pop(target, None)
    return out


def _first(row: dict, names: tuple[str, ...]) -> Any:
    """The value of the first of ``names`` that the row holds (not null), else None."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _pair_shape(row: dict) -> str | None:
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return None
    if prompt is None:
        if row.get("conversations") is not None and isinstance(chosen, dict) and isinstance(rejected, dict):
            return "sharegpt"
        if isinstance(chosen, str) and isinstance(rejected, str):
            return "implicit_prompt"
        return None
    fields = (prompt, chosen, rejected)
    if all(isinstance(v, str) for v in fields):
        return "standard"
    if all(isinstance(v, (str, list)) for v in fields):
        return "conversational"
    return None


def detect_formats(row: Any) -> tuple[str, ...]:
    """Every known shape a row fits, by its fields and their top-level types (usually one, or none).

    * ``sharegpt``: ``conversations`` and no ``prompt``; ``chosen``/``rejected`` are dicts.
    * ``implicit_prompt``: no ``prompt``; ``chosen``/``rejected`` are strings.
    * ``standard``: ``prompt``, ``chosen``, ``rejected`` all strings.
    * ``conversational``: the same three fields, each a string or a list, at least one a list.
    * ``ranked``: ``prompt`` a string or list, ``completions`` (or ``responses``) and ``scores``
      (or ``ratings``) lists. A row with ranked lists *and* a chosen/rejected pair fits two shapes.
    Message contents, list items and scores are checked when parsing, not here.
    """
    if not isinstance(row, dict):
        return ()
    found = []
    if (shape := _pair_shape(row)) is not None:
        found.append(shape)
    if (isinstance(row.get("prompt"), (str, list)) and isinstance(_first(row, _COMPLETIONS), list)
            and isinstance(_first(row, _SCORES), list)):
        found.append("ranked")
    return tuple(found)


def detect_format(row: Any) -> str | None:
    """The shape of a row (see ``detect_formats``); None where it fits no known shape, or more than one."""
    found = detect_formats(row)
    return found[0] if len(found) == 1 else None


def _parse_sharegpt(row: dict) -> tuple[list[Message], list[Message], list[Message]]:
    conversations, system = row["conversations"], row.get("system")
    if not isinstance(conversations, list) or not (system is None or isinstance(system, str)):
        raise _Drop(UNPARSEABLE)
    prompt = [_message(m) for m in conversations]
    chosen, rejected = [_message(row["chosen"])], [_message(row["rejected"])]
    if system and system.strip():
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen, rejected


def _parse_prompted(row: dict) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL standard and conversational: an explicit prompt beside the two completions."""
    prompt = _messages(row["prompt"], "user")
    chosen = _messages(row["chosen"], "assistant")
    rejected = _messages(row["rejected"], "assistant")
    # UltraFeedback style: chosen/rejected repeat the prompt's turns; keep what follows them.
    n = len(prompt)
    if len(chosen) > n and len(rejected) > n and chosen[:n] == prompt and rejected[:n] == prompt:
        chosen, rejected = chosen[n:], rejected[n:]
    return prompt, chosen, rejected


Pair = dict[str, list[Message]]  # {prompt, chosen, rejected}
Candidate = tuple[Pair | None, str]  # a pair and "", or None and its drop reason


def _undetected_reason(row: Any) -> str:
    """Why ``auto`` found no one shape: a field is absent, or the fields have the wrong types (or fit two shapes)."""
    if not isinstance(row, dict) or len(detect_formats(row)) > 1:
        return UNPARSEABLE
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None and rejected is None and (_first(row, _COMPLETIONS) is not None or _first(row, _SCORES) is not None):
        return MISSING_FIELD if _missing(row, "ranked") else UNPARSEABLE  # a ranked row lacking a part
    if chosen is None or rejected is None:
        return MISSING_FIELD
    if row.get("prompt") is None and isinstance(chosen, list) and isinstance(rejected, list):
        return MISSING_FIELD  # message lists need a prompt beside them
    return UNPARSEABLE


def _missing(row: dict, fmt: str) -> bool:
    """A field that ``fmt`` needs is absent or null (ranked rows may use either name of a list)."""
    if fmt == "ranked":
        return row.get("prompt") is None or _first(row, _COMPLETIONS) is None or _first(row, _SCORES) is None
    return any(row.get(k) is None for k in _REQUIRED[fmt])


def _score(value: Any) -> float | None:
    """A finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        return None
    return number if math.isfinite(number) else None


def score_pairs(scores: list[float], ranked_pairs: str = "best_worst", min_score_margin: float = 0.0) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` index pairs from scores (higher is better). A pair needs
    ``scores[c] > scores[r]`` and ``scores[c] - scores[r] >= min_score_margin``; ties never pair.

    ``best_worst``: at most one pair, the first highest vs the first lowest. ``all_margin``: every
    qualifying pair, ordered by ``c`` then ``r`` (row order). E.g. scores ``[1, 3, 2]`` give
    ``[(1, 0)]`` and ``[(1, 0), (1, 2), (2, 0)]``; with margin 1.5 only ``[(1, 0)]`` each."""
    if ranked_pairs not in RANKED_PAIRS:
        raise ValueError(f"unknown ranked_pairs {ranked_pairs!r}; known: {', '.join(RANKED_PAIRS)}")
    n = len(scores)
    if n == 0:
        return []
    if ranked_pairs == "best_worst":
        candidates = [(max(range(n), key=scores.__getitem__), min(range(n), key=scores.__getitem__))]
    else:
        candidates = [(c, r) for c in range(n) for r in range(n)]
    return [(c, r) for c, r in candidates if scores[c] > scores[r] and scores[c] - scores[r] >= min_score_margin]


Parsed = tuple[list[Message], list[Message], list[Message]]  # prompt, chosen, rejected


def _checked(parse: Callable[[dict], Parsed | str], row: dict) -> Candidate:
    """``parse(row)`` -> kept, or dropped: the reason ``parse`` returns or raises (``_Drop``), else
    ``invalid_unicode``, ``completion_role``, ``empty`` or ``identical``."""
    try:
        parsed = parse(row)
    except _Drop as d:
        return None, d.reason
    if isinstance(parsed, str):
        return None, parsed
    prompt, chosen, rejected = parsed
    if not all(is_valid_text(m["role"]) and is_valid_text(m["content"]) for m in (*prompt, *chosen, *rejected)):
        return None, INVALID_UNICODE
    if any(c and c[0]["role"] != "assistant" for c in (chosen, rejected)):
        return None, COMPLETION_ROLE
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return None, EMPTY
    if not prompt or not any(m["content"].strip() for m in prompt):
        return None, EMPTY
    if chosen == rejected:
        return None, IDENTICAL
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


def _parse_ranked(row: dict, ranked_pairs: str, min_score_margin: float) -> list[Candidate]:
    """A ranked row -> its candidate pairs (see ``score_pairs``), each parsed like a conversational row.
    The whole row is dropped as ``unparseable`` (the lists differ in length, or a completion is
    neither a string nor a message list), a bad message's reason (see ``_message``), ``bad_score``,
    or ``no_pair``."""
    completions, scores = _first(row, _COMPLETIONS), _first(row, _SCORES)
    if len(completions) != len(scores):
        return [(None, UNPARSEABLE)]
    for completion in completions:
        try:
            _messages(completion, "assistant")
        except _Drop as d:
            return [(None, d.reason)]
    values = [_score(s) for s in scores]
    if any(v is None for v in values):
        return [(None, BAD_SCORE)]
    pairs = score_pairs(values, ranked_pairs, min_score_margin)
    if not pairs:
        return [(None, NO_PAIR)]
    prompt = row["prompt"]
    return [_checked(_parse_prompted, {"prompt": prompt, "chosen": completions[c], "rejected": completions[r]})
            for c, r in pairs]


_PARSERS = {
    "standard": _parse_prompted,
    "conversational": _parse_prompted,
    "implicit_prompt": lambda row: _split_implicit(row["chosen"], row["rejected"]),
    "sharegpt": _parse_sharegpt,
}


def normalise_pairs(
    row: Any,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    *,
    ranked_pairs: str = "best_worst",
    min_score_margin: float = 0.0,
) -> list[Candidate]:
    """One row -> its candidate pairs, never empty: each ``(pair, "")`` or ``(None, reason)``.

    A pair row gives one candidate; a ranked row one per pair its scores give (see ``score_pairs``),
    or one ``(None, reason)`` when the row as a whole fails. ``columns`` renames fields first (see
    ``apply_columns``). ``fmt="auto"`` parses a row by its one ``detect_formats`` shape (none, or
    two: dropped). A fixed ``fmt`` (one of ``FORMATS``) drops a row lacking one of that format's
    fields as ``missing_field``, and a row not of that shape (or wrong types) as ``unparseable``;
    e.g. ``implicit_prompt`` drops a row with a ``prompt``. An unknown ``fmt`` or ``ranked_pairs``
    is a ``ValueError`` (a caller's mistake, not the row's)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if ranked_pairs not in RANKED_PAIRS:
        raise ValueError(f"unknown ranked_pairs {ranked_pairs!r}; known: {', '.join(RANKED_PAIRS)}")
    row = apply_columns(row, columns)
    found = detect_formats(row)
    if fmt == "auto":
        if len(found) != 1:
            return [(None, _undetected_reason(row))]
        shape = found[0]
    else:
        if not isinstance(row, dict):
            return [(None, UNPARSEABLE)]
        if _missing(row, fmt):
            return [(None, MISSING_FIELD)]
        if fmt not in found:
            return [(None, UNPARSEABLE)]
        shape = fmt
    if shape == "ranked":
        return _parse_ranked(row, ranked_pairs, min_score_margin)
    return [_checked(_PARSERS[shape], row)]


def normalise(
    row: Any,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    *,
    ranked_pairs: str = "best_worst",
    min_score_margin: float = 0.0,
) -> tuple[Pair | None, str]:
    """One row -> ``({prompt, chosen, rejected}, "")`` or ``(None, reason)``: the first kept pair of
    ``normalise_pairs`` (the only one, but for a ranked row with ``all_margin``), else its first reason."""
    candidates = normalise_pairs(row, fmt, columns, ranked_pairs=ranked_pairs, min_score_margin=min_score_margin)
    return next((c for c in candidates if c[0] is not None), candidates[0])


def source_format(rows: Iterable[Any], columns: dict[str, str] | None = None) -> str:
    """The one shape of a source, from some of its rows (parsed JSON values, e.g. its first 64).

    Rows of no known shape are ignored here (they are dropped one by one later, with reasons).
    Raises ``ValueError`` naming the fields seen when no row has a known shape, or when the rows
    fit different shapes (or one row fits two): guessing would train on the wrong fields."""
    keys: set[str] = set()
    shapes: set[str] = set()
    n = 0
    for row in rows:
        n += 1
        row = apply_columns(row, columns)
        if isinstance(row, dict):
            keys.update(map(str, row))
        shapes.update(detect_formats(row))
    if len(shapes) == 1:
        return shapes.pop()
    shown = sorted(keys)
    seen = (", ".join(shown[:40]) + (f", ... ({len(shown)} in all)" if len(shown) > 40 else "")) if shown else "none (no row is a JSON object)"
    if not shapes:
        raise ValueError(f"no known row shape in its first {n} rows; keys seen: {seen}. Known shapes: "
                         f"{', '.join(FORMATS)}; rename fields with data.columns")
    raise ValueError(f"ambiguous row shape: its first {n} rows fit {', '.join(sorted(shapes))}; keys seen: {seen}. "
                     f"Set data.format to one of them")
