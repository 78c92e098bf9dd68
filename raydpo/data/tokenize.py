"""Tokenize normalised pairs with the model's chat template. Pure functions over rows.

A tokenized row holds ``prompt_ids`` once and the completion ids of ``chosen`` and ``rejected``
(see ../shared/ARCHITECTURE.md). The completion ids are the suffix of the templated
prompt + completion after the templated prompt (with the generation prompt), so whatever the
template puts around an assistant turn is trained on exactly as the model will generate it.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int = 512  # tokens of prompt + longer completion
    max_prompt_length: int = 256
    truncation: str = "keep_end"  # keep_end: drop the start of the prompt; keep_start: drop its end


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool
    drop_reason: str  # "" when the pair is kept


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def completion_ids(tok: PreTrainedTokenizerBase, prompt: list[Message], completion: list[Message]) -> tuple[list[int], list[int]] | None:
    """Template ``prompt`` (with the generation prompt) and ``prompt + completion``; return
    ``(prompt_ids, completion_ids)``, the completion ending in exactly one EOS, or None where the
    templated prompt is not a token prefix of the templated whole."""
    prompt_ids = _ids(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    full_ids = _ids(tok, tok.apply_chat_template(prompt + completion, tokenize=False))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return None
    comp = full_ids[len(prompt_ids) :]
    eos = tok.eos_token_id
    if eos in comp:
        # Templates often close a turn with EOS then a newline; generation stops at EOS.
        comp = comp[: len(comp) - comp[::-1].index(eos)]
    else:
        comp = comp + [eos]
    return prompt_ids, comp


def tokenize_pair(
    tok: PreTrainedTokenizerBase,
    prompt: list[Message],
    chosen: list[Message],
    rejected: list[Message],
    settings: TokenizeSettings,
) -> TokenizedPair:
    c = completion_ids(tok, prompt, chosen)
    r = completion_ids(tok, prompt, rejected)
    if c is None or r is None:
        return TokenizedPair([], [], [], False, "template_mismatch")
    prompt_ids, chosen_ids = c
    _, rejected_ids = r
    truncated = False
    if len(prompt_ids) > settings.max_prompt_length:
        truncated = True
        keep = settings.max_prompt_length
        prompt_ids = prompt_ids[-keep:] if settings.truncation == "keep_end" else prompt_ids[:keep]
    budget = settings.max_length - len(prompt_ids)
    if max(len(chosen_ids), len(rejected_ids)) > budget:
        truncated = True
        chosen_ids, rejected_ids = chosen_ids[: max(budget, 0)], rejected_ids[: max(budget, 0)]
    if not chosen_ids or not rejected_ids:
        # An empty completion has no tokens to score: its log-prob is 0 and DPO's gradient NaN.
        return TokenizedPair([], [], [], truncated, "too_long")
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, truncated, "")
