"""Reference log-probs, computed once: read -> tokenize -> cache lookup -> actor pool for the misses.

``raydpo precompute CONFIG [--set key=value ...] [--json]`` fills the cache that ``raydpo train``
reads; both call ``reference_stage``, so a precompute followed by a train computes nothing twice.
With ``--json`` stdout is exactly one JSON object: ``cache_key``, ``rows``, ``hits``, ``misses``,
``seconds``, ``tokens_per_s`` and the rest of ``RefStats``. The same figures go to MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import ray
import ray.data

from pathlib import Path

from raydpo.config import Config, load_config_or_report
from raydpo.tracking import Tracker
from raydpo.data.refcache import Cache, CacheKey, RefStats, add_keys, count_hits, lookup, missing_sequences, model_identity, tokenizer_identity


def cache_for(cfg: Config, model_path: str, gguf_file: str | None) -> Cache:
    """The cache directory for this config's reference model, tokenizer, tokenization and dtype."""
    from raydpo.data.tokenize import chat_template_for
    from raydpo.models import load_tokenizer

    tok = load_tokenizer(model_path, gguf_file)
    key = CacheKey(model=model_identity(model_path, gguf_file),
                   tokenizer=tokenizer_identity(tok, chat_template_for(tok, cfg.data.chat_template)),
                   settings=cfg.data.tokenize_settings(), dtype=cfg.reference.dtype)
    return Cache(os.path.expanduser(cfg.reference.cache_dir), key)


def reference_stage(
    kept: ray.data.Dataset,
    cache: Cache,
    *,
    model_path: str,
    gguf_file: str | None,
    dtype: str,
    num_actors: int,
    num_cpus: float,
    num_gpus: float,
    batch_tokens: int,
    window: int,
    max_padding: float = 1.05,
    fail_after_blocks: int | None = None,
) -> tuple[ray.data.Dataset, RefStats]:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` to tokenized pairs, computing only what
    the cache lacks. The reference model is loaded (in its own actors) only if something is missing."""
    from actors.reference import ReferenceLogps

    t0 = time.perf_counter()
    cache.init()
    keyed = kept.map_batches(add_keys, batch_format="pyarrow").materialize()
    index, corrupt = cache.read_index()
    index_ref = ray.put(index.select(["key"]))
    counts = keyed.map_batches(count_hits, batch_format="pyarrow", fn_kwargs={"index_ref": index_ref}).take_all()
    rows, hits = sum(c["rows"] for c in counts), sum(c["hits"] for c in counts)
    data_key = sum(int(c["key_sum"]) for c in counts) % 2**128
    stats = RefStats(cache_key=f"{cache.key.dir_key}-{data_key:032x}", cache_dir=cache.path, rows=rows, hits=hits,
                     misses=rows - hits, corrupt_blocks=corrupt)

    missing = keyed.map_batches(missing_sequences, batch_format="pyarrow", fn_kwargs={"index_ref": index_ref})
    missing = missing.materialize()
    n_missing = missing.count()
    if n_missing:
        # One block per window, so every actor of the pool gets work (a materialized dataset may be one block).
        # Materialized before the pool starts: a pool holding every CPU (num_cpus = the cluster's) would starve it.
        missing = missing.repartition(max(num_actors, -(-n_missing // window))).materialize()
        loads_before = cache.loads()
        t1 = time.perf_counter()
        computed = missing.map_batches(
            ReferenceLogps,
            fn_constructor_kwargs={"cache": cache, "model_path": model_path, "gguf_file": gguf_file, "dtype": dtype,
                                   "batch_tokens": batch_tokens, "max_padding": max_padding,
                                   "fail_after_blocks": fail_after_blocks},
            batch_size=window,  # sequences sorted by length together
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        ).take_all()
        stats.compute_seconds = time.perf_counter() - t1
        stats.sequences_computed = sum(c["sequences"] for c in computed)
        stats.tokens = sum(c["tokens"] for c in computed)
        stats.padded_tokens = sum(c["padded_tokens"] for c in computed)
        stats.model_loads = cache.loads() - loads_before
        index, _ = cache.read_index()

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
    return line


def run(cfg: Config) -> RefStats:
    """Tokenize the config's data as ``train`` would and fill the cache for its kept pairs."""
    from jobs.train_dpo import setup

    # A new run each time, spooled in {output_dir}/precompute; an unreachable server fails here.
    tracker, _ = Tracker.start(cfg.tracking, Path(cfg.output_dir).expanduser().resolve() / "precompute",
                               cfg.tracking.run_name or "precompute", tags={"raydpo.job": "precompute"}, resume=False)
    try:
        _, model_path, sources = setup(cfg)
        stats = _fill(cfg, model_path, sources)
    except BaseException:
        tracker.finish("FAILED", timeout=cfg.tracking.flush_timeout_s)
        raise
    log_stats(tracker, stats)
    tracker.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
    return stats


def _fill(cfg: Config, model_path: str, sources: list[str]) -> RefStats:
    from jobs.train_dpo import tokenize
    from raydpo.data.pipeline import DataError, build_report, kept_rows

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    tokenized = tokenize(cfg, model_path, sources)
    report = build_report(tokenized)
    print(report.summary(), flush=True)
    if report.drop_fraction > cfg.data.max_drop_fraction:
        raise DataError(f"dropped {report.drop_fraction:.1%} of rows, over data.max_drop_fraction\n{report.summary()}")
    r = cfg.reference
    cache = cache_for(cfg, model_path, None)
    _, stats = reference_stage(kept_rows(tokenized), cache, model_path=model_path, gguf_file=None, dtype=r.dtype,
                               num_actors=r.num_actors, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                               batch_tokens=r.batch_tokens, window=r.window, max_padding=r.max_padding,
                               fail_after_blocks=r.fail_after_blocks)
    print(summary(stats), flush=True)
    return stats


def log_stats(tracker: Tracker, stats: RefStats) -> None:
    """``reference/*`` metrics, the cache key as a tag and a param, and the stats as JSON."""
    figures = {k: v for k, v in stats.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"reference/{k}": v for k, v in figures.items()}, step=0)
    tracker.set_tags({"reference.cache_key": stats.cache_key})
    tracker.log_params({"fingerprint/reference_cache": stats.cache_key})
    tracker.log_dict(stats.to_dict(), "reference_stats.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydpo precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    ns = parser.parse_args(argv)
    cfg = load_config_or_report(ns.config, ns.overrides)  # fails before Ray starts
    if cfg is None:
        return 2
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():
        stats = run(cfg)
    if ns.json:
        stdout.write(json.dumps(stats.to_dict()) + "\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

