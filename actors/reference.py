"""The reference stage: reference log-probs computed once per sequence, in an actor pool of
their own, through the cache (:func:`reference_stage`).

:class:`ReferenceLogps` is the Ray Data ``map_batches`` callable class: one model load per actor.

The training workers never hold the reference model; they read the cached columns instead. Each
call takes a window of sequences the cache lacks, forwards them packed as the trainer packs
(:func:`raydpo.logprobs.packed_logps`, rows under a token budget) at the trainer's precision, and writes their
log-probs to the cache as one block, so a precompute that stops part-way keeps every block it
finished.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from raydpo.config import ReferenceConfig
from raydpo.data.refcache import (Cache, CacheKey, RefStats, add_keys, count_hits, lookup, missing_sequences,
                                  model_identity, tokenizer_identity)
from raydpo.data.tokenize import TokenizeSettings
from raydpo.logprobs import packed_logps
from raydpo.models import load_model, load_tokenizer
from raydpo.precision import Precision, allow_tf32
from raydpo.progress import say
from raydpo.tracking import Tracker


class ReferenceLogps:
    """``key, prompt_ids, completion_ids`` rows in; one stats row per call out (the values go to the cache)."""

    def __init__(
        self,
        cache: Cache,
        model_path: str,
        gguf_file: str | None = None,
        precision: Precision = Precision("float32"),
        batch_tokens: int = 8192,
    ) -> None:
        self.cache = cache
        self.cache.record_load()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        allow_tf32(self.device)  # as the training workers: float32 matmuls in TF32 on CUDA
        # The trainer's precision (reference.dtype / reference.autocast, resolved from it), so at
        # step 0 the policy's and the reference's log-probs differ by rounding only.
        self.precision = precision
        self.model = load_model(model_path, precision.weights, gguf_file).to(self.device).eval()
        self.pad_id = load_tokenizer(model_path, gguf_file).pad_token_id
        self.batch_tokens = batch_tokens

    def window(self, batch: pa.Table) -> pa.Table:
        """The actor method of :class:`ReferencePool` (a handle cannot call ``__call__``)."""
        return self(batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        prompts = batch["prompt_ids"].to_pylist()
        completions = batch["completion_ids"].to_pylist()
        with self.precision.autocast(self.device):
            logps, forwarded = packed_logps(self.model, prompts, completions, self.pad_id, self.batch_tokens,
                                            self.device)
        tokens = np.array([len(p) + len(c) for p, c in zip(prompts, completions)], dtype=np.int32)
        self.cache.write_block(batch["key"].combine_chunks(), logps, tokens)
        return pa.table({
            "sequences": [batch.num_rows],
            "tokens": [int(tokens.sum())],
            "padded_tokens": [forwarded],  # packed: the real tokens (RefStats keeps its name)
            "seconds": [time.perf_counter() - t0],
        })


def actor_kwargs(cache: Cache, model_path: str, gguf_file: str | None, settings: ReferenceConfig) -> dict:
    """:class:`ReferenceLogps`'s arguments from the ``reference`` settings, for the Ray Data stage
    and the long-lived pool alike."""
    return {"cache": cache, "model_path": model_path, "gguf_file": gguf_file, "precision": settings.precision(),
            "batch_tokens": settings.batch_tokens}


class ReferencePool:
    """Reference actors that live for a whole online run (``reference`` settings: their number
    and resources). The model is loaded at the first sequence the cache lacks, once per actor,
    and kept: later rounds and evaluations pay only their forwards. Plain Arrow tables in and
    out, no Ray Data: a round's pairs are small, and the actors hold the CPUs a Ray Data task
    would wait for."""

    def __init__(self, cache: Cache, model_path: str, settings: ReferenceConfig, gguf_file: str | None = None) -> None:
        self.cache, self.settings = cache, settings
        self._actor = ray.remote(ReferenceLogps).options(
            num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, accelerator_type=settings.accelerator_type,
            resources=settings.resources)
        self._kwargs = actor_kwargs(cache, model_path, gguf_file, settings)
        self.actors: list = []

    def add_logps(self, pairs: pa.Table) -> tuple[pa.Table, RefStats]:
        """``pairs`` (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) with ``ref_chosen_logps`` /
        ``ref_rejected_logps``, computing only what the cache lacks, and the figures as
        :func:`reference_stage` reports them."""
        s, t0 = self.settings, time.perf_counter()
        self.cache.init()
        keyed = add_keys(pairs)
        index, corrupt, foreign = self.cache.read_index()
        index_ref = ray.put(index.select(["key"]))
        hits = count_hits(keyed, index_ref).to_pylist()[0]
        stats = RefStats(cache_key=f"{self.cache.key.dir_key}-{int(hits['key_sum']):032x}", cache_dir=self.cache.path,
                         rows=pairs.num_rows, hits=hits["hits"], misses=pairs.num_rows - hits["hits"],
                         corrupt_blocks=corrupt, foreign_blocks=foreign)
        missing = missing_sequences(keyed, index_ref)
        if missing.num_rows:
            t1, loads_before = time.perf_counter(), self.cache.loads()
            if not self.actors:
                self.actors = [self._actor.remote(**self._kwargs) for _ in range(s.num_actors)]
            windows = [missing.slice(lo, s.window) for lo in range(0, missing.num_rows, s.window)]
            computed = ray.get([self.actors[i % len(self.actors)].window.remote(w) for i, w in enumerate(windows)])
            stats.compute_seconds = time.perf_counter() - t1
            stats.sequences_computed = sum(c["sequences"][0].as_py() for c in computed)
            stats.tokens = sum(c["tokens"][0].as_py() for c in computed)
            stats.padded_tokens = sum(c["padded_tokens"][0].as_py() for c in computed)
            stats.model_loads = self.cache.loads() - loads_before
            index, _, _ = self.cache.read_index()
        with_ref = lookup(keyed, ray.put(index.select(["key", "logp"])))
        stats.seconds = time.perf_counter() - t0
        return with_ref, stats

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def reference_cache(model_path: str, gguf_file: str | None, chat_template: str | None,
                    tokenize: TokenizeSettings, settings: ReferenceConfig) -> Cache:
    """The cache directory for this reference model, tokenizer + chat template, tokenization
    settings (the object whole) and precision (its ``key``: weights dtype and autocast)."""
    from raydpo.data.tokenize import chat_template_for

    tok = load_tokenizer(model_path, gguf_file)
    key = CacheKey(model=model_identity(model_path, gguf_file),
                   tokenizer=tokenizer_identity(tok, chat_template_for(tok, chat_template)),
                   settings=tokenize, dtype=settings.precision().key)
    return Cache(os.path.expanduser(settings.cache_dir), key)


def reference_stage(
    kept: ray.data.Dataset,
    cache: Cache,
    *,
    model_path: str,
    gguf_file: str | None,
    settings: ReferenceConfig,
) -> tuple[ray.data.Dataset, RefStats]:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` to tokenized pairs, computing only what
    the cache lacks. The reference model is loaded (in its own actors) only if something is missing.
    ``settings``: the actor pool's size and resources, batch token budget, window and precision."""
    s = settings
    t0 = time.perf_counter()
    cache.init()
    keyed = kept.map_batches(add_keys, batch_format="pyarrow").materialize()
    index, corrupt, foreign = cache.read_index()
    index_ref = ray.put(index.select(["key"]))
    counts = keyed.map_batches(count_hits, batch_format="pyarrow", fn_kwargs={"index_ref": index_ref}).take_all()
    rows, hits = sum(c["rows"] for c in counts), sum(c["hits"] for c in counts)
    data_key = sum(int(c["key_sum"]) for c in counts) % 2**128
    stats = RefStats(cache_key=f"{cache.key.dir_key}-{data_key:032x}", cache_dir=cache.path, rows=rows, hits=hits,
                     misses=rows - hits, corrupt_blocks=corrupt, foreign_blocks=foreign)

    missing = keyed.map_batches(missing_sequences, batch_format="pyarrow", fn_kwargs={"index_ref": index_ref})
    missing = missing.materialize()
    n_missing = missing.count()
    if n_missing:
        # One block per window, so every actor of the pool gets work (a materialized dataset may be one block).
        # Materialized before the pool starts: a pool holding every CPU (num_cpus = the cluster's) would starve it.
        missing = missing.repartition(max(s.num_actors, -(-n_missing // s.window))).materialize()
        loads_before = cache.loads()
        t1 = time.perf_counter()
        pool = missing.map_batches(
            ReferenceLogps,
            fn_constructor_kwargs=actor_kwargs(cache, model_path, gguf_file, s),
            batch_size=s.window,  # sequences per call: packed together, one cache block
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=s.num_actors),
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            accelerator_type=s.accelerator_type,
            resources=s.resources,
            # Not set here: Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1
            # (actor_pool_map_operator.py; passing them is deprecated in 2.60), so a killed actor
            # is restarted and its windows run again. A window writes the same bytes, so the same
            # block name: nothing is lost or cached twice (tests/jobs/test_faults.py).
        )
        # A window on a large model on CPUs can take longer than Ray Data's no-progress timeout
        # (30 min; it killed a SmolLM2 run on a loaded 2-core machine): the actors are working
        # inside the window, not stuck.
        pool.context.execution_no_progress_timeout_s = -1
        computed, done, said = [], 0, 0.0
        for window in pool.iter_rows():  # one row per finished window, as it finishes
            computed.append(window)
            done, elapsed = done + window["sequences"], time.perf_counter() - t1
            if elapsed - said >= 10 or done == n_missing:  # a line at most every 10 s, and the last
                said = elapsed
                say(f"[raydpo] reference: {done}/{n_missing} sequences ({100 * done / n_missing:.0f}%), "
                    f"{elapsed:.0f}s, ETA {elapsed / done * (n_missing - done):.0f}s")
        stats.compute_seconds = time.perf_counter() - t1
        stats.sequences_computed = sum(c["sequences"] for c in computed)
        stats.tokens = sum(c["tokens"] for c in computed)
        stats.padded_tokens = sum(c["padded_tokens"] for c in computed)
        stats.model_loads = cache.loads() - loads_before
        index, _, _ = cache.read_index()

    with_ref = keyed.map_batches(lookup, batch_format="pyarrow", fn_kwargs={"index_ref": ray.put(index.select(["key", "logp"]))})
    stats.seconds = time.perf_counter() - t0
    return with_ref, stats


def summary(stats: RefStats) -> str:
    s = stats
    line = (f"[raydpo] reference: {s.rows} pairs, {s.hits} cached, {s.misses} computed "
            f"({s.sequences_computed} sequences, {s.tokens} tokens")
    if s.tokens:
        line += f", {s.tokens_per_s:.0f} tokens/s, padding x{s.padding_waste:.3f}"
    line += f") in {s.seconds:.1f}s; cache {s.cache_dir}"
    if s.corrupt_blocks:
        line += f"; {s.corrupt_blocks} corrupt block(s) deleted and recomputed"
    if s.foreign_blocks:
        line += f"; {s.foreign_blocks} block(s) of another cache key (another model or settings) deleted and recomputed"
    return line


def log_stats(tracker: Tracker, stats: RefStats) -> None:
    """``reference/*`` metrics, the cache key as a tag and a param, and the stats as JSON."""
    figures = {k: v for k, v in stats.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"reference/{k}": v for k, v in figures.items()}, step=0)
    tracker.set_tags({"reference.cache_key": stats.cache_key})
    tracker.log_params({"fingerprint/reference_cache": stats.cache_key})
    tracker.log_dict(stats.to_dict(), "reference_stats.json")
