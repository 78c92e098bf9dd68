"""Checks shared by the data tests."""
from __future__ import annotations

from raydpo.data.formats import REASONS


def is_messages(value: object) -> bool:
    """A non-empty list of ``{role, content}`` string messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["role"], str) and isinstance(m["content"], str)
        for m in value
    )


def assert_normalised(out: dict | None, reason: str) -> None:
    """The contract of ``normalise``: a known drop reason, or a well-formed distinct pair."""
    if out is None:
        assert reason in REASONS
    else:
        assert reason == ""
        assert set(out) == {"prompt", "chosen", "rejected"}
        assert all(is_messages(out[k]) for k in out)
        assert out["chosen"] != out["rejected"]
