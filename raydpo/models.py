"""Load a causal LM and its tokenizer: hub id, local folder, GGUF file, or the built-in tiny model.

The tiny model (``name_or_path: tiny``) is a random-init Llama built from a config, with a
character-level tokenizer built in code: it needs no download and trains in seconds on a CPU,
which is what the quickstart and the tests use.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

TINY = "tiny"

# A chat template in the style of ChatML, short enough that a tiny model's context holds it.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TINY_SPECIALS = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_TINY_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per printable ASCII char) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS + list(_TINY_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    # Split into single characters, keeping every one of them (spaces included).
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random-init Llama; the same seed gives the same weights on every machine."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_tiny(out_dir: str | os.PathLike, **size: int) -> Path:
    """Save the tiny model and tokenizer as a plain HF folder (idempotent: same seed, same files)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), **size)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_plain(name_or_path: str, gguf_file: str, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """De-quantize a GGUF model once into a plain HF folder that every actor then loads fast."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    load_model(name_or_path, dtype, gguf_file).save_pretrained(tmp)
    load_tokenizer(name_or_path, gguf_file).save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a model
    return out


def write_safetensors(name_or_path: str, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert a model whose weights are pickles into a safetensors folder, once (the config's
    ``model.allow_pickle`` allows reading it); every actor then loads safetensors only."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    load_model(name_or_path, dtype, allow_pickle=True).save_pretrained(tmp)  # safetensors (transformers 5 writes no other)
    load_tokenizer(name_or_path).save_pretrained(tmp)
    tmp.rename(out)
    return out


def has_only_pickles(name_or_path: str) -> bool:
    """A local folder with pickled weights and no safetensors (a hub id is not looked into: the
    loaders then ask for safetensors and fail where the repository has none)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return False
    return not any(folder.glob("*.safetensors")) and any(
        f for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in folder.glob(pattern))


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    if name_or_path == TINY:
        return build_tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    if tok.pad_token_id is None:
        # Padding is masked out everywhere, so any id serves; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "float32", gguf_file: str | None = None,
               allow_pickle: bool = False) -> PreTrainedModel:
    """Load a trainable causal LM from safetensors only: a pickle (``.bin``, ``.pt``) can run code
    when it is loaded, so it is read only with ``allow_pickle`` (``model.allow_pickle``, which
    ``write_safetensors`` uses once). Remote code is never trusted (transformers' default). A GGUF
    file is de-quantized into a plain model, because transformers marks a GGUF-loaded model as
    quantized and refuses to train or save it."""
    torch_dtype = DTYPES[dtype]
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype,
                                                    use_safetensors=None if allow_pickle else True)
    quantized = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, dtype=torch_dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(quantized.state_dict())
    return plain
