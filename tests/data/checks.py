"""Checks shared by the data tests."""
from __future__ import annotations

import json

from raydpo.data.formats import REASONS, is_valid_text


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
        assert all(is_valid_text(m[f]) for k in out for m in out[k] for f in ("role", "content"))


def bpe_tokenizer(merges: list[tuple[str, str]] | None = None, *, use_regex: bool = True,
                  corpus: list[str] | None = None, chat_template: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 style: space is ``Ġ``, newline ``Ċ``; EOS ``<eos>``).

    With ``merges``: exactly those merges over single byte-chars (the vocabulary is the byte
    alphabet plus each merge's result), so a test knows every token. With ``corpus``: trained on it.
    ``use_regex=False`` pre-tokenizes nothing, so merges may cross word and turn boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if merges is not None:
        vocab = {t: i for i, t in enumerate(["<eos>", *sorted(alphabet), *(a + b for a, b in merges)])}
        core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    else:
        core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    core.decoder = decoders.ByteLevel()
    if merges is None:
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False)
        core.train_from_iterator(corpus or [], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = chat_template
    return tok


# --- hostile input: what a parser, a template or a tokenizer may choke on ----------------------
# Hypothesis's st.text never makes a lone surrogate; these strategies and the seeded generator do.

LONE_SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")
# Text that is valid but odd: NUL and other control bytes, non-BMP, noncharacters, BOM, bidi
# override, line separators, a special token, template syntax (must stay inert), a combining mark.
ODD_TEXT = ("\x00", "a\x00b", "\x01\x07\x1b[0m", "\x7f", "😀🏳️‍🌈", "\uffff\ufffe", "\ufeff", "\u202eabc", "\u2028\u2029\x85",
            "<|end|>", "<|assistant|>", "{{ raise_exception('x') }}", "{% for %}", "e\u0301", "\U0010ffff", "\\ud800")


def hostile_text():
    """A hypothesis strategy of strings: ordinary text, lone surrogates alone or inside text, odd
    characters (``ODD_TEXT``) and huge strings (one character repeated, so cheap to make)."""
    from hypothesis import strategies as st

    surrogate = st.sampled_from(LONE_SURROGATES)
    return st.one_of(
        st.text(max_size=20),
        surrogate,
        st.tuples(st.text(max_size=8), surrogate, st.text(max_size=8)).map("".join),
        st.text(st.characters(codec=None, categories=["Cs", "Cc", "Co", "Cn"]), max_size=8),
        st.sampled_from(ODD_TEXT),
        st.builds(lambda c, k: c * k, st.sampled_from(["a", " ", "\x00", "é", "😀"]), st.integers(10_000, 50_000)),
    )


# Chat templates that raise on some rows, as real ones do. GEMMA and MISTRAL are those models'
# templates (Gemma 2 and Mistral 7B Instruct v0.1): Gemma raises on a system turn, both on roles
# out of order. PY_ERRORS fails in its expressions where a content holds a marker: ``#div``
# (ZeroDivisionError), ``#add`` (TypeError), ``#val`` (ValueError), ``#undef`` (UndefinedError).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PY_ERRORS_TEMPLATE = (
    "{% for m in messages %}"
    "{% if '#div' in m['content'] %}{{ (m['content'] | length) // 0 }}{% endif %}"
    "{% if '#add' in m['content'] %}{{ m['content'] + 1 }}{% endif %}"
    "{% if '#val' in m['content'] %}{{ m['content'].index('no such text') }}{% endif %}"
    "{% if '#undef' in m['content'] %}{{ nothing.at_all }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEMPLATES = {"own": None, "gemma": GEMMA_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "py_errors": PY_ERRORS_TEMPLATE}

# Tags of generated rows (``hostile_rows``) and the reason each must get, per template; "dropped":
# any reason; "": anything, kept included.
_MUST = {
    "deep": {t: "too_deeply_nested" for t in TEMPLATES},
    "surrogate": {t: "invalid_unicode" for t in TEMPLATES},
    "system": {"gemma": "template_error", "mistral": "template_error"},
    "order": {"gemma": "template_error", "mistral": "template_error"},
    "py_error": {"py_errors": "template_error"},
    "dropped": {t: "dropped" for t in TEMPLATES},
}


def must_reason(tag: str, template: str) -> str:
    """What the row of ``tag`` must get under ``template`` (a key of ``TEMPLATES``): a reason, "dropped", or ""."""
    return _MUST.get(tag, {}).get(template, "")


def assert_reason(reason: str, tag: str, template: str, where: object) -> None:
    must = must_reason(tag, template)
    if must == "dropped":
        assert reason, (where, tag)
    elif must:
        assert reason == must, (where, tag, reason)


def _word(rng) -> str:
    """Mostly plain words; sometimes odd text (``ODD_TEXT``: never a lone surrogate, which has its own tag) or a huge string."""
    roll = rng.random()
    if roll < 0.6:
        return "".join(rng.choice("abcdefghij klmnop?!") for _ in range(rng.randint(1, 12))).strip() or "x"
    if roll < 0.98:
        return "w" + rng.choice(ODD_TEXT)
    return rng.choice("xé😀\x00") * rng.randint(5_000, 20_000)


_WRONG = (None, 0, -1, 2.5, True, {}, [], [1, 2], [[["deep"]]], {"role": "user"}, [None], "")


def _messages(rng, roles: list[str]) -> list[dict]:
    return [{"role": role, "content": _word(rng)} for role in roles]


def _pair(rng, shape: str) -> dict:
    """A row of ``shape`` that normalises to a pair (distinct, non-empty completions)."""
    a, b = _word(rng), _word(rng)
    b = b if b != a else b + "!"
    if shape == "standard":
        return {"prompt": _word(rng), "chosen": a, "rejected": b}
    if shape == "conversational":
        turns = rng.choice([["user"], ["user", "assistant", "user"], ["system", "user"]])
        return {"prompt": _messages(rng, [r for r in turns if r != "system"]),  # a system turn is its own tag
                "chosen": [{"role": "assistant", "content": a}], "rejected": [{"role": "assistant", "content": b}]}
    if shape == "implicit_prompt":
        head = f"\n\nHuman: {_word(rng)}\n\nAssistant:"
        return {"chosen": f"{head} {a}", "rejected": f"{head} {b}"}
    if shape == "sharegpt":
        return {"conversations": [{"from": "human", "value": _word(rng)}],
                "chosen": {"from": "gpt", "value": a}, "rejected": {"from": "gpt", "value": b}}
    return {"prompt": _word(rng), "completions": [a, b], "scores": [2, 1]}  # ranked


def _with_surrogate(rng, row: dict, shape: str) -> dict:
    """The prompt (shared by every pair of the row) gets a lone surrogate in a content or a role."""
    s = rng.choice(LONE_SURROGATES)
    if shape in ("standard", "ranked"):
        row["prompt"] = row["prompt"] + s
    elif shape == "conversational":
        m = rng.choice(row["prompt"])
        m[rng.choice(["content", "role"])] += s
    elif shape == "implicit_prompt":
        row["chosen"] = row["chosen"].replace("Human: ", "Human: " + s, 1)
        row["rejected"] = row["rejected"].replace("Human: ", "Human: " + s, 1)
    else:  # sharegpt
        row["conversations"][0]["value"] += s
    return row


def _wrong_type(rng, row: dict) -> object:
    """Break a row at a random level: the row itself, a field, a message, a message's role or content."""
    level = rng.randrange(4)
    if level == 0:
        return rng.choice([None, 1, "text", [row], [], 3.5])
    key = rng.choice([k for k in ("prompt", "chosen", "rejected", "conversations") if k in row])
    value = row[key]
    if level == 1 or not isinstance(value, (list, dict)):
        row[key] = rng.choice([v for v in _WRONG if v != ""])
        return row
    message = rng.choice(value) if isinstance(value, list) else value
    if level == 2 and isinstance(value, list):
        value[value.index(message)] = rng.choice([None, 1, "text", [message], []])
        return row
    field = rng.choice(list(message))
    message[field] = rng.choice([v for v in _WRONG if not isinstance(v, str)])
    return row


def _deep(rng) -> str:
    """Nesting past the parser's stack: bare, or inside a field of an otherwise good row."""
    n = rng.choice([5_000, 20_000, 50_000])
    inner = "[" * n + "]" * n
    return rng.choice([inner, "[" * n, '{"prompt": "q", "chosen": ' + inner + ', "rejected": "b"}', "{\"a\":" * n])


def _junk(rng) -> str:
    """Text that is not a row: broken JSON, an integer too long to convert, NaN, a bare value."""
    good = json.dumps(_pair(rng, "standard"))
    return rng.choice([good[: rng.randint(1, max(1, len(good) - 1))], "9" * 5000, "NaN", "-Infinity", "[1, 2]",
                       '"just a string"', "null", "true", "{'single': 'quotes'}", "{\"a\": 1} trailing",
                       '{"prompt": "\\ud800', "\x00{}", "[" * 300 + "]" * 300])


SHAPES = ("standard", "conversational", "implicit_prompt", "sharegpt", "ranked")


def hostile_rows(seed: int, n: int, shapes: tuple[str, ...] = SHAPES) -> list[tuple[str, str]]:
    """``n`` records as ``(JSON text, tag)``, seeded: pairs of the given shapes (many with odd
    text), and among them lone surrogates (``surrogate``), nesting past the parser's stack
    (``deep``), rows broken at every level and junk (``dropped``), a system turn first
    (``system``), two user turns in a row (``order``), template error markers (``py_error``).
    ``must_reason`` says what each tag must get. Each text is one line, never blank, and
    Arrow- and UTF-8-safe (a surrogate stays a JSON escape, as every reader leaves it)."""
    import random

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for _ in range(n):
        shape = rng.choice(shapes)
        row = _pair(rng, shape)
        kind = rng.choices(["plain", "surrogate", "deep", "wrong_type", "junk", "system", "order", "py_error"],
                           [40, 10, 4, 16, 8, 8, 6, 8])[0]
        tag = kind if kind in ("surrogate", "deep", "system", "order", "py_error") else ""
        if kind == "surrogate":
            row = _with_surrogate(rng, row, shape)
        elif kind == "wrong_type":
            row, tag = _wrong_type(rng, row), "dropped"
        elif kind in ("system", "order"):
            if shape != "conversational":
                tag = ""  # only a message list can hold these turns
            else:
                first = {"role": "system", "content": _word(rng)} if kind == "system" else {"role": "user", "content": "hi"}
                row["prompt"] = [first, *_messages(rng, ["user"])]
        elif kind == "py_error":
            marker = rng.choice(["#div", "#add", "#val", "#undef"])
            if shape in ("standard", "ranked"):
                row["prompt"] += marker
            elif shape == "conversational":
                row["prompt"][-1]["content"] += marker
            else:
                tag = ""
        if kind == "deep":
            text = _deep(rng)
        elif kind == "junk":
            text, tag = _junk(rng), "dropped"
        else:
            text = json.dumps(row, ensure_ascii=rng.random() < 0.5 or kind == "surrogate")
        out.append((text, tag))
    return out
