"""Reference log-probs as a Ray Data ``map_batches`` callable class: one model load per actor.

The training workers never hold the reference model; they read the cached columns instead. Each
call takes a window of sequences the cache lacks, forwards them in length-sorted batches under a
token budget, and writes their log-probs to the cache as one block, so a precompute that stops
part-way keeps every block it finished.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from raydpo.data.refcache import Cache
from raydpo.logprobs import budgeted_logps
from raydpo.models import load_model, load_tokenizer


class ReferenceLogps:
    """``key, prompt_ids, completion_ids`` rows in; one stats row per call out (the values go to the cache)."""

    def __init__(
        self,
        cache: Cache,
        model_path: str,
        gguf_file: str | None = None,
        dtype: str = "float32",
        batch_tokens: int = 8192,
        max_padding: float = 1.05,
        fail_after_blocks: int | None = None,
    ) -> None:
        self.cache = cache
        self.cache.record_load()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype, gguf_file).to(self.device).eval()
        self.pad_id = load_tokenizer(model_path, gguf_file).pad_token_id
        self.batch_tokens = batch_tokens
        self.max_padding = max_padding
        self.fail_after_blocks = fail_after_blocks  # fault injection, for testing resume
        self.blocks = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        prompts = batch["prompt_ids"].to_pylist()
        completions = batch["completion_ids"].to_pylist()
        logps, padded = budgeted_logps(self.model, prompts, completions, self.pad_id, self.batch_tokens,
                                       self.device, self.max_padding)
        tokens = np.array([len(p) + len(c) for p, c in zip(prompts, completions)], dtype=np.int32)
        self.cache.write_block(batch["key"].combine_chunks(), logps, tokens)
        self.blocks += 1
        if self.fail_after_blocks is not None and self.blocks >= self.fail_after_blocks:
            raise RuntimeError(f"fault injection: reference.fail_after_blocks={self.fail_after_blocks}")
        return pa.table({
            "sequences": [batch.num_rows],
            "tokens": [int(tokens.sum())],
            "padded_tokens": [padded],
            "seconds": [time.perf_counter() - t0],
        })
