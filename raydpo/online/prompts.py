"""The prompts of online DPO: read once, templated and tokenized as a generator is given them,
and split into a training set and a fixed evaluation set.

A prompt row is a JSON object with ``prompt`` (a string, or a list of ``{role, content}``
messages); its other fields travel with it to the judge (a verifier's reference answer, say).
A row that does not parse, lacks a usable prompt or fails the chat template is counted by reason
(the data pipeline's reasons) and reported, never a crash. The evaluation set is chosen by a
seeded hash of the prompt text, so it is the same in every round and on every resume.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from raydpo.data.formats import EMPTY, INVALID_UNICODE, MISSING_FIELD, is_valid_text, parse_row
from raydpo.data.sources import read_rows, source_items
from raydpo.data.tokenize import TokenizeSettings, prompt_ids
from raydpo.online.judges import PromptItem


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the whole prompt set: stable across rounds and resumes
    item: PromptItem  # what the judge sees
    ids: list[int]  # what the generator is given (templated, with the generation prompt)


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    read: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0  # prompts cut to data.max_prompt_length

    def summary(self) -> str:
        drops = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"[raydpo] prompts: {self.read} read, {len(self.train)} for training, {len(self.eval)} held out "
                f"for evaluation; dropped: {drops}; truncated: {self.truncated}")


def _messages(value: Any) -> list[dict[str, str]] | str:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else EMPTY
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return MISSING_FIELD


def _text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def parse_prompt(row: Any) -> tuple[list[dict[str, str]], dict[str, Any]] | str:
    """A prompt row -> ``(messages, row)``, or a drop reason."""
    if not isinstance(row, dict) or "prompt" not in row:
        return MISSING_FIELD
    messages = _messages(row["prompt"])
    if isinstance(messages, str):
        return messages
    if not all(is_valid_text(m["content"]) for m in messages):
        return INVALID_UNICODE
    return messages, row


def _rank(text: str, seed: int) -> float:
    """A seeded hash of the text in [0, 1): the same prompts are held out on every run."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def load_prompts(rows: Sequence[dict[str, Any]], tok, settings: TokenizeSettings, chat_template: str | None,
                 n_eval: int, seed: int) -> PromptSet:
    """Parse and tokenize ``rows`` (dicts, or ``{"text": JSON}`` records from ``read_rows``);
    the ``n_eval`` prompts with the lowest seeded hash of their text are held out."""
    kept: list[tuple[list[dict[str, str]], dict[str, Any], list[int]]] = []
    out = PromptSet([], [])
    for raw in rows:
        out.read += 1
        if "text" in raw and "source" in raw:  # a record from read_rows: JSON text
            value, reason = parse_row(raw["text"])
            if reason:
                out.dropped[reason] += 1
                continue
        else:
            value = raw
        parsed = parse_prompt(value)
        if isinstance(parsed, str):
            out.dropped[parsed] += 1
            continue
        messages, row = parsed
        ids = prompt_ids(tok, messages, settings, chat_template)
        if isinstance(ids, str):
            out.dropped[ids] += 1
            continue
        out.truncated += ids[1]
        kept.append((messages, row, ids[0]))
    order = sorted(range(len(kept)), key=lambda i: _rank(_text(kept[i][0]), seed))
    held = set(order[:n_eval])
    for i, (messages, row, ids) in enumerate(kept):
        prompt = Prompt(i, PromptItem(messages, _text(messages), row), ids)
        (out.eval if i in held else out.train).append(prompt)
    return out


def read_prompt_rows(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """Every record of the prompt sources (files, globs, URIs, HF datasets), on the driver: a
    prompt set is small next to the generations it leads to."""
    return [row for item in source_items(entries, "train") for row in read_rows(item)]
