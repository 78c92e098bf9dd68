"""Every known row shape -> one schema ``{prompt, chosen, rejected}`` of chat messages.

``normalise(row)`` returns the normalised row or a drop reason; it never raises on bad input.
Shapes: TRL standard (strings), TRL conversational (message lists; ``prompt`` may be a string and
``chosen``/``rejected`` whole conversations, as UltraFeedback-binarized), implicit-prompt
dialogues (Anthropic HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), and ShareGPT
(LLaMA-Factory: ``{conversations: [{from, value}, ...], chosen: {from, value}, rejected: {from, value}}``,
optionally ``system``).

``normalise(row, fmt, columns)``: ``columns`` (target -> source column) renames fields first;
``fmt`` is ``"auto"`` (``detect_format`` per row) or one of ``FORMATS``, which drops rows of any other
shape: ``missing_field`` when a field of the format is absent, ``unparseable`` otherwise.
"""
from __future__ import annotations

from typing import Any

Message = dict[str, str]

MISSING_FIELD = "missing_field"
EMPTY = "empty"
IDENTICAL = "identical"
NO_COMMON_PREFIX = "no_common_prefix"
UNPARSEABLE = "unparseable"
TOO_LONG = "too_long"
TEMPLATE_MISMATCH = "template_mismatch"
REASONS = (MISSING_FIELD, EMPTY, IDENTICAL, NO_COMMON_PREFIX, UNPARSEABLE, TOO_LONG, TEMPLATE_MISMATCH)

FORMATS = ("standard", "conversational", "implicit_prompt", "sharegpt")
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "conversations", "system")
# The fields each fixed format needs; one absent (or null) is ``missing_field``.
_REQUIRED = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}

_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT = "\n\nAssistant:"


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


def detect_format(row: Any) -> str | None:
    """The shape of a row, by its fields and their top-level types; None where it is no known shape.

    * ``sharegpt``: ``conversations`` and no ``prompt``; ``chosen``/``rejected`` are dicts.
    * ``implicit_prompt``: no ``prompt``; ``chosen``/``rejected`` are strings.
    * ``standard``: ``prompt``, ``chosen``, ``rejected`` all strings.
    * ``conversational``: the same three fields, each a string or a list, at least one a list.
    Message contents are checked when parsing (``unparseable``), not here.
    """
    if not isinstance(row, dict):
        return None
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


def _undetected_reason(row: Any) -> str:
    """Why ``auto`` found no shape: a field is absent, or the fields have the wrong types."""
    if not isinstance(row, dict):
        return UNPARSEABLE
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return MISSING_FIELD
    if row.get("prompt") is None and isinstance(chosen, list) and isinstance(rejected, list):
        return MISSING_FIELD  # message lists need a prompt beside them
    return UNPARSEABLE


_PARSERS = {
    "standard": _parse_prompted,
    "conversational": _parse_prompted,
    "implicit_prompt": lambda row: _split_implicit(row["chosen"], row["rejected"]),
    "sharegpt": _parse_sharegpt,
}


def normalise(
    row: Any, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[dict[str, list[Message]] | None, str]:
    """One row -> ``({prompt, chosen, rejected}, "")`` or ``(None, reason)``.

    ``columns`` renames fields first (see ``apply_columns``). ``fmt="auto"`` parses each row by its
    ``detect_format`` shape. A fixed ``fmt`` (one of ``FORMATS``) drops a row lacking one of that
    format's fields as ``missing_field``, and a row of another shape (or wrong types) as
    ``unparseable``; e.g. ``implicit_prompt`` drops a row with a ``prompt``. An unknown ``fmt`` is a
    ``ValueError`` (a caller's mistake, not the row's)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    row = apply_columns(row, columns)
    detected = detect_format(row)
    if fmt == "auto":
        if detected is None:
            return None, _undetected_reason(row)
    else:
        if not isinstance(row, dict):
            return None, UNPARSEABLE
        if any(row.get(k) is None for k in _REQUIRED[fmt]):
            return None, MISSING_FIELD
        if detected != fmt:
            return None, UNPARSEABLE
    parsed = _PARSERS[detected](row)
    if isinstance(parsed, str):
        return None, parsed
    prompt, chosen, rejected = parsed
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return None, EMPTY
    if not prompt or not any(m["content"].strip() for m in prompt):
        return None, EMPTY
    if chosen == rejected:
        return None, IDENTICAL
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""
