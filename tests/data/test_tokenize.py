"""Tests of ``raydpo.data.tokenize`` with the built-in character-level tiny tokenizer (one token
per character; specials ``<|pad|>=0 <|unk|>=1 <|end|>=2 (EOS) <|system|>=3 <|user|>=4 <|assistant|>=5``).

With the tiny ChatML-like template, prompt ``[user "hi"]`` and completion ``[assistant "Yes"]``::

    prompt (with generation prompt) = "<|user|>hi<|end|><|assistant|>"      -> [4, h, i, 2, 5]
    prompt + completion             = "<|user|>hi<|end|><|assistant|>Yes<|end|>"
    completion ids                  = [Y, e, s, 2]  (the suffix; ends in exactly one EOS)

Template choice and the BPE boundary use small byte-level BPE tokenizers built in the test
(``tests.data.checks.bpe_tokenizer``), so every expected token is known.
"""
from __future__ import annotations

import copy

import pytest

from raydpo.data.formats import TEMPLATE_ERROR, TOO_LONG
from raydpo.data.tokenize import (
    MIN_ROW_BYTES,
    PLAIN_CHAT_TEMPLATE,
    ROW_BYTES_PER_TOKEN,
    TokenizeSettings,
    chat_template_for,
    completion_ids,
    prompt_ids,
    tokenize_pair,
    utf8_size,
)
from raydpo.models import build_tiny_tokenizer
from tests.data.checks import bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


WIDE = TokenizeSettings(max_length=512, max_prompt_length=256)
EOS = 2


def test_tiny_tokenizer_assumptions(tok) -> None:
    assert tok.eos_token_id == EOS
    assert ids(tok, "<|user|>hi<|end|><|assistant|>") == [4, ids(tok, "h")[0], ids(tok, "i")[0], 2, 5]


def test_prompt_once_completion_suffix_one_eos(tok) -> None:
    prompt = [user("hi")]
    out = tokenize_pair(tok, prompt, [assistant("Yes")], [assistant("No way")], WIDE)
    assert out.drop_reason == ""
    assert out.truncated is False
    assert out.prompt_ids == ids(tok, "<|user|>hi<|end|><|assistant|>")
    assert out.chosen_ids == ids(tok, "Yes") + [EOS]
    assert out.rejected_ids == ids(tok, "No way") + [EOS]
    for comp in (out.chosen_ids, out.rejected_ids):
        assert comp[-1] == EOS and comp.count(EOS) == 1
    # prompt + completion is the templated whole: nothing lost or doubled at the seam.
    whole = tok.apply_chat_template(prompt + [assistant("Yes")], tokenize=False)
    assert out.prompt_ids + out.chosen_ids == ids(tok, whole)


def test_multi_turn_prompt_appears_once(tok) -> None:
    prompt = [{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")]
    out = tokenize_pair(tok, prompt, [assistant("good")], [assistant("bad")], WIDE)
    assert out.drop_reason == ""
    assert out.prompt_ids == ids(tok, "<|system|>S<|end|><|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>")
    assert out.chosen_ids == ids(tok, "good") + [EOS]
    assert ids(tok, "<|user|>")[0] not in out.chosen_ids + out.rejected_ids


def test_template_closing_turn_with_eos_newline_keeps_one_eos(tok) -> None:
    """Turns end with ``<|end|>\\n``; the completion stops at the EOS, like generation does:
    "Yes<|end|>\\n" -> [Y, e, s, EOS]."""
    t = with_template(
        tok,
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == ""
    assert out.prompt_ids == ids(t, "<|user|>hi<|end|>\n<|assistant|>")
    assert out.chosen_ids == ids(t, "Yes") + [EOS]
    assert out.rejected_ids == ids(t, "No") + [EOS]


def test_template_without_eos_gets_one_appended(tok) -> None:
    t = with_template(
        tok,
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    prompt_ids, comp = completion_ids(t, [user("hi")], [assistant("Yes")])
    assert prompt_ids == ids(t, "<|user|>hi\n<|assistant|>")
    assert comp == ids(t, "Yes\n") + [EOS]
    assert comp.count(EOS) == 1


@pytest.mark.parametrize(
    "template",
    [
        # A default system prompt only when add_generation_prompt is false.
        "{% if not add_generation_prompt %}<|system|>default<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        # The last message is rendered differently from earlier ones.
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if not loop.last %}.{% endif %}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    ],
    ids=["system_only_without_generation_prompt", "last_message_differs"],
)
def test_prompt_not_a_prefix_is_template_mismatch(tok, template: str) -> None:
    t = with_template(tok, template)
    assert completion_ids(t, [user("hi")], [assistant("Yes")]) is None
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "template_mismatch"
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == ([], [], [])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation(tok, mode: str) -> None:
    """A 50-character prompt templates to 1 + 50 + 1 + 1 = 53 tokens; max_prompt_length 20 keeps
    the last 20 (keep_end, ending in the generation prompt) or the first 20 (keep_start)."""
    text = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"
    assert len(text) == 50
    full_prompt = ids(tok, "<|user|>" + text + "<|end|><|assistant|>")
    assert len(full_prompt) == 53
    s = TokenizeSettings(max_length=40, max_prompt_length=20, truncation=mode)
    out = tokenize_pair(tok, [user(text)], [assistant("Yes")], [assistant("No")], s)
    assert out.drop_reason == ""
    assert out.truncated is True
    assert out.prompt_ids == (full_prompt[-20:] if mode == "keep_end" else full_prompt[:20])
    assert out.chosen_ids == ids(tok, "Yes") + [EOS]  # fits in the 40 - 20 = 20 left
    assert out.rejected_ids == ids(tok, "No") + [EOS]


def test_prompt_at_the_limit_is_not_truncated(tok) -> None:
    """"<|user|>ab<|end|><|assistant|>" is 5 tokens: max_prompt_length 5 keeps it whole."""
    s = TokenizeSettings(max_length=20, max_prompt_length=5)
    out = tokenize_pair(tok, [user("ab")], [assistant("Yes")], [assistant("No")], s)
    assert out.truncated is False
    assert len(out.prompt_ids) == 5


def test_long_completion_is_cut_to_the_budget(tok) -> None:
    """Prompt "<|user|>hi<|end|><|assistant|>" = 5 tokens, max_length 12 -> budget 7.
    chosen "0123456789" + EOS = 11 tokens -> its first 7; rejected "No" + EOS = 3 tokens, kept whole."""
    s = TokenizeSettings(max_length=12, max_prompt_length=8)
    out = tokenize_pair(tok, [user("hi")], [assistant("0123456789")], [assistant("No")], s)
    assert out.drop_reason == ""
    assert out.truncated is True
    assert len(out.prompt_ids) == 5
    assert out.chosen_ids == ids(tok, "0123456")
    assert out.rejected_ids == ids(tok, "No") + [EOS]
    assert len(out.prompt_ids) + max(len(out.chosen_ids), len(out.rejected_ids)) <= s.max_length


def test_completion_exactly_at_the_budget_is_not_truncated(tok) -> None:
    """Prompt 5 tokens + "Yes" + EOS (4 tokens) = 9 = max_length."""
    s = TokenizeSettings(max_length=9, max_prompt_length=8)
    out = tokenize_pair(tok, [user("hi")], [assistant("Yes")], [assistant("No")], s)
    assert out.truncated is False
    assert out.chosen_ids == ids(tok, "Yes") + [EOS]


def test_completion_left_empty_is_too_long(tok) -> None:
    """A prompt cut to max_prompt_length == max_length leaves a budget of 0: no completion token
    to score, so the pair is dropped as too_long (its log-prob would be 0, DPO's gradient NaN)."""
    s = TokenizeSettings(max_length=6, max_prompt_length=6)
    out = tokenize_pair(tok, [user("a long prompt")], [assistant("Yes")], [assistant("No")], s)
    assert out.drop_reason == "too_long"
    assert out.truncated is True
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == ([], [], [])


# --- chat template choice: configured, the tokenizer's own, or the plain built-in one -----------


def test_plain_template_for_a_tokenizer_without_one(tok) -> None:
    """No chat template: the plain one. "User: hi\\n\\nAssistant:" is the prompt; the completion is
    " Yes" (its leading space included) and the EOS that closes the assistant turn."""
    bare = with_template(tok, None)
    assert chat_template_for(bare) == PLAIN_CHAT_TEMPLATE and chat_template_for(tok) is None
    out = tokenize_pair(bare, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "" and out.boundary_fixed is False
    assert out.prompt_ids == ids(tok, "User: hi\n\nAssistant:")
    assert out.chosen_ids == ids(tok, " Yes") + [EOS]
    assert out.rejected_ids == ids(tok, " No") + [EOS]


def test_plain_template_multi_turn_and_system(tok) -> None:
    bare = with_template(tok, None)
    prompt = [{"role": "system", "content": "Be brief."}, user("a"), assistant("b"), user("c")]
    out = tokenize_pair(bare, prompt, [assistant("good")], [assistant("bad")], WIDE)
    assert out.prompt_ids == ids(tok, "Be brief.\n\nUser: a\n\nAssistant: b<|end|>\n\nUser: c\n\nAssistant:")
    assert out.chosen_ids == ids(tok, " good") + [EOS]


def test_configured_template_overrides_the_tokenizers_own(tok) -> None:
    """The tiny tokenizer has a ChatML-like template; a configured one wins, and is used by a
    tokenizer without any template too."""
    configured = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|end|>{% endfor %}"
                  "{% if add_generation_prompt %}[assistant]{% endif %}")
    for t in (tok, with_template(tok, None)):
        out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE, chat_template=configured)
        assert out.prompt_ids == ids(tok, "[user]hi<|end|>[assistant]")
        assert out.chosen_ids == ids(tok, "Yes") + [EOS]
    assert completion_ids(tok, [user("hi")], [assistant("Yes")], configured) == (
        ids(tok, "[user]hi<|end|>[assistant]"), ids(tok, "Yes") + [EOS])


def test_default_system_prompt_appears_once(tok) -> None:
    """TRL PR 1930: a template that inserts a default system prompt when the conversation has
    none. Prompt and whole are each templated once, so it is in the prompt once and never in a
    completion."""
    t = with_template(
        tok,
        "{% if messages[0]['role'] != 'system' %}<|system|>Be nice.<|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "" and out.boundary_fixed is False
    assert out.prompt_ids == ids(t, "<|system|>Be nice.<|end|><|user|>hi<|end|><|assistant|>")
    assert out.prompt_ids.count(3) == 1  # <|system|>
    assert out.chosen_ids == ids(t, "Yes") + [EOS]
    assert out.rejected_ids == ids(t, "No") + [EOS]
    # An explicit system message replaces the default.
    out = tokenize_pair(t, [{"role": "system", "content": "S"}, user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.prompt_ids == ids(t, "<|system|>S<|end|><|user|>hi<|end|><|assistant|>")


# --- BPE merges across the prompt/completion boundary -----------------------------------------

# A template whose generation prompt ends in a space: "Q: hi\nA: " + "Yes" is "Q: hi\nA: Yes".
SPACE_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                  "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}A: {% endif %}")


def test_bpe_merge_across_the_boundary_is_relocated() -> None:
    """GPT-2 style byte-level BPE splits " Yes" as one word: the prompt alone ends in a lone "Ġ"
    token, the whole has "ĠYes". The prompt ids are the whole's tokens before "ĠYes"; the
    completion is ["ĠYes", EOS], and prompt + completion is exactly the whole's ids."""
    t = bpe_tokenizer(corpus=["Q: hi", "A: Yes", "A: No"] * 10, chat_template=SPACE_TEMPLATE)
    tid = t.convert_tokens_to_ids
    prompt_alone = t(t.apply_chat_template([user("hi")], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert t.convert_ids_to_tokens(prompt_alone) == ["Q", ":", "Ġhi", "Ċ", "A", ":", "Ġ"]
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "" and out.boundary_fixed is True
    assert out.prompt_ids == tid(["Q", ":", "Ġhi", "Ċ", "A", ":"])
    assert out.chosen_ids == tid(["ĠYes", "<eos>"])
    assert out.rejected_ids == tid(["ĠNo", "<eos>"])
    whole = t.apply_chat_template([user("hi"), assistant("Yes")], tokenize=False)
    assert out.prompt_ids + out.chosen_ids + tid(["Ċ"]) == t(whole, add_special_tokens=False)["input_ids"]


def test_bpe_merge_straddling_the_boundary_differently_per_completion() -> None:
    """No pre-tokenizer, merges ("Ġ","Y"), (":","ĠY"), ("e","s"). Chosen whole "Q: hi\\nA: Yes":
    [Q : Ġ h i Ċ A :ĠY es <eos>], where ":ĠY" straddles the boundary (after "A: ") and so belongs
    to the completion. Rejected whole "Q: hi\\nA: No": [Q : Ġ h i Ċ A : Ġ N o <eos>], an exact
    prefix split. The prompt is stored once: the shared tokens [Q : Ġ h i Ċ A]; the rejected
    completion then starts with the prompt's remaining [: Ġ], so each prompt + completion is
    exactly its whole's ids."""
    template = SPACE_TEMPLATE.replace("{{ eos_token }}\n", "{{ eos_token }}")
    t = bpe_tokenizer([("Ġ", "Y"), (":", "ĠY"), ("e", "s")], use_regex=False, chat_template=template)
    tid = t.convert_tokens_to_ids
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "" and out.boundary_fixed is True
    assert out.prompt_ids == tid(["Q", ":", "Ġ", "h", "i", "Ċ", "A"])
    assert out.chosen_ids == tid([":ĠY", "es", "<eos>"])
    assert out.rejected_ids == tid([":", "Ġ", "N", "o", "<eos>"])
    for completion, comp_ids in (("Yes", out.chosen_ids), ("No", out.rejected_ids)):
        whole = t.apply_chat_template([user("hi"), assistant(completion)], tokenize=False)
        assert out.prompt_ids + comp_ids == t(whole, add_special_tokens=False)["input_ids"]
    # One completion alone: its own boundary, the straddling token first.
    assert completion_ids(t, [user("hi")], [assistant("Yes")]) == (
        tid(["Q", ":", "Ġ", "h", "i", "Ċ", "A"]), tid([":ĠY", "es", "<eos>"]))


def test_bpe_without_a_merge_across_the_boundary_is_not_flagged() -> None:
    t = bpe_tokenizer(corpus=["Q: hi", "A: Yes", "A: No"] * 10,
                      chat_template=SPACE_TEMPLATE.replace("A: {% endif %}", "A:{% endif %}"))
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], WIDE)
    assert out.drop_reason == "" and out.boundary_fixed is False
    assert out.chosen_ids == t.convert_tokens_to_ids(["ĠYes", "<eos>"])


def test_relocated_boundary_still_truncates() -> None:
    """The re-located prompt (6 tokens) is cut to max_prompt_length 4, keeping its end."""
    t = bpe_tokenizer(corpus=["Q: hi", "A: Yes", "A: No"] * 10, chat_template=SPACE_TEMPLATE)
    out = tokenize_pair(t, [user("hi")], [assistant("Yes")], [assistant("No")], TokenizeSettings(8, 4))
    assert out.drop_reason == "" and out.truncated is True and out.boundary_fixed is True
    assert out.prompt_ids == t.convert_tokens_to_ids(["Ġhi", "Ċ", "A", ":"])
    assert out.chosen_ids == t.convert_tokens_to_ids(["ĠYes", "<eos>"])


# --- the size bound and roles the plain template does not know (issue 26) ------------------------


def test_max_row_bytes_is_derived_from_max_length_with_a_floor() -> None:
    from dataclasses import asdict

    assert TokenizeSettings(512, 256).max_row_bytes == MIN_ROW_BYTES == 1 << 20  # 256 x 512 = 128 KiB < 1 MiB
    assert TokenizeSettings(8192, 4096).max_row_bytes == ROW_BYTES_PER_TOKEN * 8192 == 2 << 20
    # A property, not a field: the reference cache's key (asdict of the settings) is unchanged.
    assert asdict(TokenizeSettings()) == {"max_length": 512, "max_prompt_length": 256, "truncation": "keep_end"}


def test_utf8_size() -> None:
    assert [utf8_size(t) for t in ("", "abc", "é", "😀", "a\ud800")] == [0, 3, 2, 4, 4]


def test_text_past_the_bound_is_too_long_and_never_tokenized(tok) -> None:
    """A templated text over ``max_row_bytes`` is ``too_long`` before any tokenizer sees it (for
    callers that skip the pipeline's row bound): 8 MiB would take the character-level tokenizer
    about a minute and 4 GB; the bound answers at once. A text just under it is tokenized and cut."""
    import time

    settings = TokenizeSettings(64, 32)
    huge = "x" * (8 << 20)
    started = time.monotonic()
    for prompt, chosen in (([user(huge)], [assistant("a")]), ([user("q")], [assistant(huge)])):
        t = tokenize_pair(tok, prompt, chosen, [assistant("b")], settings)
        assert (t.drop_reason, t.prompt_ids, t.chosen_ids) == (TOO_LONG, [], [])
    assert prompt_ids(tok, [user(huge)], settings) == TOO_LONG
    assert completion_ids(tok, [user(huge)], [assistant("a")]) is None
    assert time.monotonic() - started < 5
    # Multi-byte text counts in bytes: 600 k "é" is 1.2 MB, over the 1 MiB bound.
    assert tokenize_pair(tok, [user("é" * 600_000)], [assistant("a")], [assistant("b")], settings).drop_reason == TOO_LONG
    under = tokenize_pair(tok, [user("p" * 20_000)], [assistant("a")], [assistant("b")], settings)
    assert under.drop_reason == "" and under.truncated and len(under.prompt_ids) == 32


@pytest.mark.parametrize("role", ["Wizard", "tool", "", "User"])
def test_plain_template_never_renders_a_made_up_speaker(tok, role: str) -> None:
    """A role the plain template does not know raises in the template (``template_error``), for
    callers that skip ``formats`` (which maps case and aliases, and drops the rest as unknown_role)."""
    base = with_template(tok, PLAIN_CHAT_TEMPLATE)
    t = tokenize_pair(base, [{"role": role, "content": "q"}], [assistant("a")], [assistant("b")], TokenizeSettings(64, 32))
    assert t.drop_reason == TEMPLATE_ERROR
    t = tokenize_pair(base, [user("q")], [{"role": role, "content": "a"}], [assistant("b")], TokenizeSettings(64, 32))
    assert t.drop_reason == TEMPLATE_ERROR
