"""Tokenize normalised pairs with a chat template. Pure functions over rows.

A tokenized row holds ``prompt_ids`` once and the completion ids of ``chosen`` and ``rejected``
(see ../shared/ARCHITECTURE.md). The completion ids are the suffix of the templated
prompt + completion after the templated prompt (with the generation prompt), so whatever the
template puts around an assistant turn is trained on exactly as the model will generate it.

The template (``chat_template_for``): the configured one (``data.chat_template``) when given, else
the tokenizer's own, else ``PLAIN_CHAT_TEMPLATE`` for a base model that has none.

The boundary: usually the templated prompt, tokenized alone, is a token prefix of the templated
whole. Where it is not (a BPE merge across the seam, e.g. a prompt ending in a space before
``" Yes"``), but the prompt *text* is a character prefix of the whole text, the whole is split at
that character position with the tokenizer's offsets: a token that straddles it belongs to the
completion, so ``prompt_ids + completion_ids`` is exactly the whole's ids. Such a pair is flagged
``boundary_fixed``. Where even the text is not a prefix (a template that renders the prompt
differently when it is alone), the pair is dropped as ``template_mismatch``.

Row-level failures are drop reasons, never exceptions: a template that fails on the row (its
``raise_exception``, as Gemma's on a system turn or Mistral's on roles out of order, or any error
its expressions raise on the row's data) is ``template_error``, and rendered text holding a lone
surrogate, which tokenizers reject with a ``TypeError``, is ``invalid_unicode``. A template that
does not compile fails every row alike, so it is the run's error: ``check_chat_template``.

Memory: a fast tokenizer holds a few hundred bytes per byte of the text it is given (measured:
about 200 for a byte-level BPE, 500 for a character-level one), so a 50 MB row took a worker to
10-25 GB. Text past ``TokenizeSettings.max_row_bytes`` is therefore never tokenized: the pipeline
drops such a row as ``too_long`` before parsing it, and every rendered text is checked again
before it reaches the tokenizer (for callers that skip the pipeline), so one row costs at most
about 500 x ``max_row_bytes`` while tokenizing (0.5 GB at the 1 MiB floor).
"""
from __future__ import annotations

from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

from raydpo.data.formats import INVALID_UNICODE, TEMPLATE_ERROR, TEMPLATE_MISMATCH, TOO_LONG, is_valid_text

Message = dict[str, str]

# For a base model without a chat template: plain text turns, the completion after "Assistant:"
# (its leading space included), each assistant turn closed by EOS. E.g. user "hi", assistant "Yes":
# "User: hi\n\nAssistant: Yes<eos>\n\n"; the generation prompt is "User: hi\n\nAssistant:".
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}"  # never a made-up speaker
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# The size bound of a row, in UTF-8 bytes of its JSON text (see TokenizeSettings.max_row_bytes).
# Natural text in JSON takes at most about 32 bytes per token, even written as \uXXXX escapes
# (6 bytes per character; a CJK token is 1-2 characters, an emoji is a 12-byte surrogate pair);
# 256 bytes per token of max_length is 8 times max_length tokens at that rate. Only max_length
# tokens are ever trained on (the prompt cut to its last max_prompt_length tokens with keep_end,
# the completions to the rest), so a row past the bound could give at most 1/8 of its text, even
# with its prompt repeated in chosen and rejected (UltraFeedback style).
ROW_BYTES_PER_TOKEN = 256
MIN_ROW_BYTES = 1 << 20  # 1 MiB: the bound never falls below it, however small max_length


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int = 512  # tokens of prompt + longer completion
    max_prompt_length: int = 256
    truncation: str = "keep_end"  # keep_end: drop the start of the prompt; keep_start: drop its end

    @property
    def max_row_bytes(self) -> int:
        """UTF-8 bytes of a row's JSON text (and of any text given to the tokenizer) past which it
        is dropped as ``too_long`` without being parsed or tokenized: ``ROW_BYTES_PER_TOKEN *
        max_length``, at least ``MIN_ROW_BYTES``. A property, not a field: the reference cache's key
        hashes the fields, and this bound only decides which rows are tokenized at all."""
        return max(MIN_ROW_BYTES, ROW_BYTES_PER_TOKEN * self.max_length)


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool
    drop_reason: str  # "" when the pair is kept
    boundary_fixed: bool = False  # the prompt/completion boundary was re-located (see the module doc)


def chat_template_for(tok: PreTrainedTokenizerBase, configured: str | None = None) -> str | None:
    """The ``chat_template`` argument for ``apply_chat_template``: ``configured`` when given, None
    (the tokenizer's own) when the tokenizer has one, else ``PLAIN_CHAT_TEMPLATE``."""
    if configured:
        return configured
    return None if tok.chat_template else PLAIN_CHAT_TEMPLATE


def check_chat_template(template: str) -> None:
    """Raise ``ValueError`` (with the line) where a configured template does not compile: that fails
    every row alike, so it stops the run before any row is read instead of dropping them all."""
    # The compiler apply_chat_template itself uses (cached), so the same templates pass and fail.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template line {e.lineno}: {e.message}") from None


class _Dropped(Exception):
    """A row-level failure deep inside templating or tokenizing; ``tokenize_pair`` makes it the drop reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# What a template's expressions can raise on a row's data: its raise_exception and undefined names
# (TemplateError), wrong types, bad values, division by zero or overflow, a missing index or key.
_TEMPLATE_FAILURES = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError)


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (a lone surrogate counted as 3), without a copy for ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _render(tok: PreTrainedTokenizerBase, messages: list[Message], template: str | None, generation_prompt: bool,
            max_bytes: int) -> str:
    """The templated text, or ``_Dropped``: ``template_error``, ``invalid_unicode``, or ``too_long``
    past ``max_bytes`` (checked here, before any tokenizer sees it: see the module doc)."""
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                       chat_template=template)
    except jinja2.TemplateSyntaxError:
        raise  # the template itself is broken: every row would fail (see check_chat_template)
    except _TEMPLATE_FAILURES as e:
        raise _Dropped(TEMPLATE_ERROR) from e
    if not is_valid_text(text):  # a template's own text can hold a lone surrogate too
        raise _Dropped(INVALID_UNICODE)
    if utf8_size(text) > max_bytes:
        raise _Dropped(TOO_LONG)
    return text


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _Whole:
    """The templated prompt + completion as tokens, and where its prompt ends."""

    ids: list[int]
    prompt_len: int  # the leading tokens that lie wholly inside the templated prompt text
    exact: bool  # the templated prompt tokenized alone is a token prefix of ``ids``


@dataclass(frozen=True)
class _Prompt:
    """The templated prompt (with the generation prompt) as text and tokens: made once per pair."""

    messages: list[Message]
    text: str
    ids: list[int]


def _prompt(tok: PreTrainedTokenizerBase, prompt: list[Message], template: str | None, max_bytes: int) -> _Prompt:
    text = _render(tok, prompt, template, True, max_bytes)
    return _Prompt(prompt, text, _ids(tok, text))


def _whole(tok: PreTrainedTokenizerBase, p: _Prompt, completion: list[Message], template: str | None,
           max_bytes: int) -> _Whole | None:
    """Template and tokenize ``prompt + completion``; None where the templated prompt (with the
    generation prompt) is not even a character prefix of the templated whole, or a token boundary
    is needed from a tokenizer without offsets (a slow one)."""
    prompt_text, prompt_ids = p.text, p.ids
    whole_text = _render(tok, p.messages + completion, template, False, max_bytes)
    whole_ids = _ids(tok, whole_text)
    if whole_ids[: len(prompt_ids)] == prompt_ids:
        return _Whole(whole_ids, len(prompt_ids), True)
    if not whole_text.startswith(prompt_text):
        return None
    try:
        enc = tok(whole_text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        return None
    boundary = len(prompt_text)
    offsets = enc["offset_mapping"]
    # The first token reaching past the boundary starts the completion (a straddling one included).
    k = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(offsets))
    return _Whole(list(enc["input_ids"]), k, False)


def _completion(ids: list[int], start: int, eos: int) -> list[int]:
    """``ids[start:]`` ending in exactly one EOS: cut after its last EOS, or one appended."""
    comp = ids[start:]
    if eos in comp:
        # Templates often close a turn with EOS then a newline; generation stops at EOS.
        return comp[: len(comp) - comp[::-1].index(eos)]
    return comp + [eos]


def completion_ids(
    tok: PreTrainedTokenizerBase, prompt: list[Message], completion: list[Message], chat_template: str | None = None,
    max_bytes: int = MIN_ROW_BYTES,
) -> tuple[list[int], list[int]] | None:
    """Template ``prompt`` (with the generation prompt) and ``prompt + completion``; return
    ``(prompt_ids, completion_ids)``, the completion ending in exactly one EOS, or None where the
    templated prompt is not a character prefix of the templated whole (``template_mismatch``), the
    template fails on the messages, they hold a lone surrogate, or a templated text is over
    ``max_bytes`` (see the module doc). ``prompt_ids`` are the whole's tokens before the boundary."""
    template = chat_template_for(tok, chat_template)
    try:
        whole = _whole(tok, _prompt(tok, prompt, template, max_bytes), completion, template, max_bytes)
    except _Dropped:
        return None
    if whole is None:
        return None
    return whole.ids[: whole.prompt_len], _completion(whole.ids, whole.prompt_len, tok.eos_token_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(
    tok: PreTrainedTokenizerBase,
    prompt: list[Message],
    chosen: list[Message],
    rejected: list[Message],
    settings: TokenizeSettings,
    chat_template: str | None = None,
) -> TokenizedPair:
    """One normalised pair -> ``prompt_ids`` once, ``chosen_ids``, ``rejected_ids`` (each ending in
    one EOS unless cut to the length budget), or a drop reason (``template_mismatch``, ``too_long``
    (no completion token fits the budget, or a templated text is over ``settings.max_row_bytes``:
    never tokenized), ``template_error``, ``invalid_unicode``).

    ``chat_template`` is the configured template (see ``chat_template_for``). The prompt is stored
    once, so it is the longest token prefix the two wholes share within the prompt text; a token
    of the prompt text past it (only where a boundary was re-located and the two wholes differ
    before it) leads both completions, so ``prompt_ids + chosen_ids`` is the chosen whole's ids."""
    template = chat_template_for(tok, chat_template)
    try:
        # The prompt is shared by both wholes: three renders and tokenizations, not four.
        p = _prompt(tok, prompt, template, settings.max_row_bytes)
        c = _whole(tok, p, chosen, template, settings.max_row_bytes)
        r = _whole(tok, p, rejected, template, settings.max_row_bytes)
    except _Dropped as d:
        return TokenizedPair([], [], [], False, d.reason)
    if c is None or r is None:
        return TokenizedPair([], [], [], False, TEMPLATE_MISMATCH)
    n = min(c.prompt_len, r.prompt_len)
    n = _common_prefix(c.ids[:n], r.ids[:n])
    if n == 0:  # no prompt token to condition on
        return TokenizedPair([], [], [], False, TEMPLATE_MISMATCH)
    eos = tok.eos_token_id
    prompt_ids = c.ids[:n]
    chosen_ids = c.ids[n : c.prompt_len] + _completion(c.ids, c.prompt_len, eos)
    rejected_ids = r.ids[n : r.prompt_len] + _completion(r.ids, r.prompt_len, eos)
    boundary_fixed = not (c.exact and r.exact)
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
        return TokenizedPair([], [], [], truncated, TOO_LONG, boundary_fixed)
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, truncated, "", boundary_fixed)


def prompt_ids(
    tok: PreTrainedTokenizerBase, prompt: list[Message], settings: TokenizeSettings, chat_template: str | None = None
) -> tuple[list[int], bool] | str:
    """A prompt alone, as a generator is given it: templated with the generation prompt (the same
    template as ``tokenize_pair``), cut to ``settings.max_prompt_length`` by ``settings.truncation``.
    Returns ``(ids, truncated)``, or a drop reason (``template_error``, ``invalid_unicode``,
    ``too_long`` for a prompt that renders to nothing or to more than ``settings.max_row_bytes``)."""
    try:
        ids = _prompt(tok, prompt, chat_template_for(tok, chat_template), settings.max_row_bytes).ids
    except _Dropped as d:
        return d.reason
    if not ids:
        return TOO_LONG
    keep = settings.max_prompt_length
    if len(ids) <= keep:
        return ids, False
    return (ids[-keep:] if settings.truncation == "keep_end" else ids[:keep]), True
