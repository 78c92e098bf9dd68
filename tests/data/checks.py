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
