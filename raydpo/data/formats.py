"""Every known row shape -> one schema ``{prompt, chosen, rejected}`` of chat messages.

``normalise(row)`` returns the normalised row or a drop reason; it never raises on bad input.
Shapes: TRL standard (strings), TRL conversational (message lists; ``prompt`` may be a string and
``chosen``/``rejected`` whole conversations, as UltraFeedback-binarized), and implicit-prompt
dialogues (Anthropic HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).
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


def normalise(row: Any) -> tuple[dict[str, list[Message]] | None, str]:
    """One row -> ``({prompt, chosen, rejected}, "")`` or ``(None, reason)``."""
    if not isinstance(row, dict):
        return None, UNPARSEABLE
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if chosen_raw is None or rejected_raw is None:
        return None, MISSING_FIELD
    prompt_raw = row.get("prompt")
    if prompt_raw is None:
        if not (isinstance(chosen_raw, str) and isinstance(rejected_raw, str)):
            # Message lists need a prompt beside them; anything else is the wrong type.
            return None, MISSING_FIELD if isinstance(chosen_raw, list) and isinstance(rejected_raw, list) else UNPARSEABLE
        split = _split_implicit(chosen_raw, rejected_raw)
        if isinstance(split, str):
            return None, split
        prompt, chosen, rejected = split
    else:
        prompt = _messages(prompt_raw, "user")
        chosen = _messages(chosen_raw, "assistant")
        rejected = _messages(rejected_raw, "assistant")
        if prompt is None or chosen is None or rejected is None:
            return None, UNPARSEABLE
        # UltraFeedback style: chosen/rejected repeat the prompt's turns; keep what follows them.
        n = len(prompt)
        if len(chosen) > n and len(rejected) > n and chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return None, EMPTY
    if not prompt or not any(m["content"].strip() for m in prompt):
        return None, EMPTY
    if chosen == rejected:
        return None, IDENTICAL
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""
