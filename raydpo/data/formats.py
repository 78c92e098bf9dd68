"""Every known row shape -> one schema ``{prompt, chosen, rejected}`` of chat messages.

``parse_row(text)`` turns a record's JSON text into a row, and ``normalise(row)`` returns the
normalised row or a drop reason; neither raises on bad input, whatever its types or nesting.
Shapes: TRL standard (strings), TRL conversational (message lists; ``prompt`` may be a string and
``chosen``/``rejected`` whole conversations, as UltraFeedback-binarized), implicit-prompt
dialogues (Anthropic HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), and ShareGPT
(LLaMA-Factory: ``{conversations: [{from, value}, ...], chosen: {from, value}, rejected: {from, value}}``,
optionally ``system``), and ranked rows (``{prompt, completions|responses: [...], scores|ratings: [...]}``,
each completion a string or a message list, which become pairs: see ``ranked_pairs``).

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
from collections.abc import Iterable
from typing import Any

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
REASONS = (MISSING_FIELD, EMPTY, IDENTICAL, NO_COMMON_PREFIX, UNPARSEABLE, TOO_LONG, TEMPLATE_MISMATCH,
           BAD_SCORE, NO_PAIR, INVALID_UNICODE, TOO_DEEPLY_NESTED, TEMPLATE_ERROR)

FORMATS = ("standard", "conversational", "implicit_prompt", "sharegpt", "ranked")
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "conversations", "system", "completions", "scores")
RANKED_PAIRS = ("best_worst", "all_margin")
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
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}

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


def _messages(value: Any, default_role: str) -> list[Message] | None:
    """A string becomes one message; a list must hold {role, content} string dicts."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


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


def _sharegpt_message(value: Any) -> Message | None:
    if not (isinstance(value, dict) and isinstance(value.get("from"), str) and isinstance(value.get("value"), str)):
        return None
    role = _SHAREGPT_ROLES.get(value["from"].strip().lower())
    return {"role": role, "content": value["value"]} if role else None


def _parse_sharegpt(row: dict) -> tuple[list[Message], list[Message], list[Message]] | str:
    conversations, system = row["conversations"], row.get("system")
    if not isinstance(conversations, list) or not (system is None or isinstance(system, str)):
        return UNPARSEABLE
    prompt = [_sharegpt_message(m) for m in conversations]
    chosen, rejected = _sharegpt_message(row["chosen"]), _sharegpt_message(row["rejected"])
    if chosen is None or rejected is None or any(m is None for m in prompt):
        return UNPARSEABLE
    if chosen["role"] != "assistant" or rejected["role"] != "assistant":
        return UNPARSEABLE
    if system and system.strip():
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, [chosen], [rejected]


def _parse_prompted(row: dict) -> tuple[list[Message], list[Message], list[Message]] | str:
    """TRL standard and conversational: an explicit prompt beside the two completions."""
    prompt = _messages(row["prompt"], "user")
    chosen = _messages(row["chosen"], "assistant")
    rejected = _messages(row["rejected"], "assistant")
    if prompt is None or chosen is None or rejected is None:
        return UNPARSEABLE
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


def _checked(parsed: tuple[list[Message], list[Message], list[Message]] | str) -> Candidate:
    """A parsed pair -> kept, or dropped as ``invalid_unicode`` / ``empty`` / ``identical``; a reason passes through."""
    if isinstance(parsed, str):
        return None, parsed
    prompt, chosen, rejected = parsed
    if not all(is_valid_text(m["role"]) and is_valid_text(m["content"]) for m in (*prompt, *chosen, *rejected)):
        return None, INVALID_UNICODE
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return None, EMPTY
    if not prompt or not any(m["content"].strip() for m in prompt):
        return None, EMPTY
    if chosen == rejected:
        return None, IDENTICAL
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


def _parse_ranked(row: dict, ranked_pairs: str, min_score_margin: float) -> list[Candidate]:
    """A ranked row -> its candidate pairs (see ``score_pairs``), each parsed like a conversational row.
    The whole row is dropped as ``unparseable`` (a completion is neither a string nor messages, or the
    lists differ in length), ``bad_score``, or ``no_pair``."""
    completions, scores = _first(row, _COMPLETIONS), _first(row, _SCORES)
    if len(completions) != len(scores) or any(_messages(c, "assistant") is None for c in completions):
        return [(None, UNPARSEABLE)]
    values = [_score(s) for s in scores]
    if any(v is None for v in values):
        return [(None, BAD_SCORE)]
    pairs = score_pairs(values, ranked_pairs, min_score_margin)
    if not pairs:
        return [(None, NO_PAIR)]
    prompt = row["prompt"]
    return [_checked(_parse_prompted({"prompt": prompt, "chosen": completions[c], "rejected": completions[r]}))
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
    return [_checked(_PARSERS[shape](row))]


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
