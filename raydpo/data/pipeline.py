"""Ray Data: read -> normalise -> tokenize -> (reference columns). Returns datasets + a DataReport.

Reading is line-based, so one malformed line is one dropped, counted row, never a failed job: every
row-level failure of parsing, normalising, templating or tokenizing is a drop reason (see
``formats.REASONS``); a row whose text is past ``TokenizeSettings.max_row_bytes`` is ``too_long``
before it is parsed, so no row can take a worker's memory. Only a whole source (unreadable, of
unknown shape) or a template that does not compile stops the run. Every row read is accounted for:
``kept + sum(dropped) == read``.

Retries: Ray Data retries a task whose worker died for ever by default (``max_retries=-1``), and Ray
core retries a task its memory monitor killed ``task_oom_retries`` times (default -1: forever)
whenever the task's ``max_retries`` is not 0 (``TaskManager::AddPendingTask``), reading that
setting in the driver when it starts Ray. So a worker out of memory looped for ever, silently.
Every stage here runs with ``stage_retries()``: ``TASK_RETRIES`` where the driver bounded OOM
retries before ``ray.init`` (``bound_oom_retries``), else 0; past them the run fails with
``DataWorkerLost``, which names the stage and what to change.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from raydpo.data.formats import (
    FORMATS,
    RANKED_PAIRS,
    TOO_LONG,
    normalise_pairs,
    parse_row,
    source_format,
)
from raydpo.data.sources import read_rows, source_items
from raydpo.data.tokenize import (
    MIN_ROW_BYTES,
    ROW_BYTES_PER_TOKEN,
    TokenizedPair,
    TokenizeSettings,
    check_chat_template,
    tokenize_pair,
    utf8_size,
)
from raydpo.errors import InputError, find_cause
from raydpo.models import load_tokenizer

TOKENIZED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_id", pa.int64()),
        # The k-th kept pair of an input row (a ranked row can give several); 0 on a dropped row,
        # so each input row has exactly one output row with pair_index 0.
        ("pair_index", pa.int32()),
        ("split", pa.string()),  # "train" | "eval"
        ("drop_reason", pa.string()),  # "" when kept
        ("truncated", pa.bool_()),
        ("boundary_fixed", pa.bool_()),  # the prompt/completion token boundary was re-located
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
)
READ_BLOCK_ROWS = 1024  # raw rows per tokenize task (see tokenized_dataset)
TASK_RETRIES = 2  # retries of a data task whose worker died or was killed for memory (see the module doc)
OOM_RETRIES_ENV = "RAY_task_oom_retries"  # Ray core's setting, read by the driver at ray.init
TOKENIZE_STAGE = "data (read -> normalise -> tokenize)"
TRAIN_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class DataReport:
    """What happened to every row read. ``read``, ``kept`` and ``dropped`` count input rows
    (``kept + sum(dropped) == read``); ``pairs`` counts the kept pairs (a ranked row may give
    several); ``truncated`` and ``boundary_fixed`` count output rows (pairs, or a dropped row);
    ``splits`` counts kept pairs per split. ``sources`` holds the same counts per source."""

    read: int = 0
    kept: int = 0
    pairs: int = 0
    truncated: int = 0
    boundary_fixed: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first 3 "source:row_id"
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)  # kept pairs per split
    # part -> {p50, p90, p99, max} token lengths over kept pairs; set from ``length_stats``, not by build_report.
    lengths: dict[str, dict[str, int | None]] = field(default_factory=dict)

    @property
    def drop_fraction(self) -> float:
        return (self.read - self.kept) / self.read if self.read else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "pairs": self.pairs,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "boundary_fixed": self.boundary_fixed,
            "examples": self.examples,
            "sources": self.sources,
            "splits": self.splits,
            "lengths": self.lengths,
        }

    def summary(self) -> str:
        lines = [f"data: read {self.read}, kept {self.kept}, truncated {self.truncated}, pairs {self.pairs}, "
                 f"boundary re-located {self.boundary_fixed}"]
        lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items())))
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


class DataError(InputError, RuntimeError):
    """The input is too broken to train on; the message carries the report."""


class DataWorkerLost(RuntimeError):
    """A data task's worker died, or was killed for memory, on every try. Not an ``InputError``: a
    row too big to tokenize is dropped (``too_long``) before it can do that, so this is the
    cluster's memory (or a crash), not the user's data."""


def bound_oom_retries(retries: int = TASK_RETRIES) -> bool:
    """Bound Ray core's retries of a task killed for memory (``RAY_task_oom_retries``) in this
    driver; call it before ``ray.init``. Returns whether the bound holds: True where it was set
    before Ray started (here or by the user), False where Ray was already started without it (the
    setting is read at ``ray.init``; the data stages then run without retries: see ``stage_retries``)."""
    if OOM_RETRIES_ENV in os.environ:
        return True
    if ray.is_initialized():
        return False
    os.environ[OOM_RETRIES_ENV] = str(retries)
    return True


def stage_retries() -> int:
    """``max_retries`` of every data stage: ``TASK_RETRIES`` where this driver bounded OOM retries
    (``OOM_RETRIES_ENV`` holds a number >= 0), else 0, because with any other ``max_retries`` Ray
    would retry a task killed for memory for ever."""
    try:
        bounded = int(os.environ.get(OOM_RETRIES_ENV, "-1")) >= 0
    except ValueError:
        bounded = False
    return TASK_RETRIES if bounded else 0


def _remote_args() -> dict[str, Any]:
    """Ray remote args of every data stage (all alike, so Ray Data fuses the stages as before)."""
    return {"max_retries": stage_retries()}


# Ray 2.60's map_batches / flat_map take max_retries only through **ray_remote_args, which it
# marks deprecated (removal planned for Ray 2.64) with no named parameter yet: its warning would
# reach the user's console on every run. Revisit when raydpo moves past Ray 2.63.
warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")


# What Ray raises where a task's worker process is gone: it died (a crash, the kernel's OOM
# killer), Ray's memory monitor killed it, or its node died.
_WORKER_LOST = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)


def materialize(ds: ray.data.Dataset, stage: str, settings: TokenizeSettings | None = None) -> ray.data.MaterializedDataset:
    """``ds.materialize()``, where a worker lost on every try is ``DataWorkerLost`` naming ``stage``,
    how often it was tried, and what to change (``settings``: the bound that applied to rows)."""
    try:
        return ds.materialize()
    except Exception as e:
        lost = find_cause(e, _WORKER_LOST)
        if lost is None:
            raise
        oom = isinstance(lost, ray.exceptions.OutOfMemoryError)
        what = "was killed for running out of memory" if oom else "died (out of memory, or a crash)"
        retries = stage_retries()
        if oom and retries:  # Ray core counts OOM kills against task_oom_retries, not max_retries
            retries = int(os.environ[OOM_RETRIES_ENV])
        bound = (f"Rows over {settings.max_row_bytes:,} bytes are dropped as too_long before tokenizing, so one "
                 f"row needs at most about {500 * settings.max_row_bytes / 2**30:.1f} GiB there. " if settings else "")
        cause = str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__
        raise DataWorkerLost(
            f"{stage}: a Ray worker {what} on each of {retries + 1} tries of the same task ({retries} retries), so the "
            f"run stops. {bound}Give each worker more memory (nodes with more memory, or fewer CPUs per node so "
            f"fewer tasks share it), or lower data.max_length (the row bound is {ROW_BYTES_PER_TOKEN} bytes per token "
            f"of it, at least {MIN_ROW_BYTES // 2**20} MiB). Ray's error: {cause}"
        ) from e


def _held_out(prompt: list[dict[str, str]], seed: int, fraction: float) -> bool:
    """Split by a hash of the prompt, so a prompt is never in both train and eval."""
    digest = hashlib.blake2b(json.dumps(prompt, sort_keys=True).encode() + str(seed).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64 < fraction


@lru_cache(maxsize=2)
def _tokenizer(model_path: str, gguf_file: str | None):  # once per Ray worker process
    return load_tokenizer(model_path, gguf_file)


def tokenize_batch(
    batch: pa.Table,
    *,
    model_path: str,
    gguf_file: str | None,
    settings: TokenizeSettings,
    eval_fraction: float,
    seed: int,
    columns: dict[str, str] | None = None,
    fmt: str = "auto",
    formats: dict[str, str] | None = None,
    chat_template: str | None = None,
    ranked_pairs: str = "best_worst",
    min_score_margin: float = 0.0,
) -> pa.Table:
    """Normalise and tokenize a batch of raw lines (``source, row_id, split, text``).

    A line over ``settings.max_row_bytes`` (UTF-8) is dropped as ``too_long`` unparsed. An input row gives one output row per kept pair (``pair_index`` 0, 1, ...; ``drop_reason ""``),
    or, with none kept, one row carrying the first reason of its pairs. ``columns``, ``fmt``,
    ``ranked_pairs`` and ``min_score_margin`` go to ``normalise_pairs``; ``formats`` (source ->
    format, from ``tokenized_dataset``'s detection) overrides ``fmt`` per source. ``chat_template``
    goes to ``tokenize_pair`` (None: the tokenizer's own, else the plain one)."""
    tok = _tokenizer(model_path, gguf_file)
    formats = formats or {}
    out: dict[str, list] = {name: [] for name in TOKENIZED_SCHEMA.names}

    def emit(source: str, row_id: int, index: int, split: str, reason: str, t: TokenizedPair | None) -> None:
        kept = t is not None and not reason
        out["source"].append(source)
        out["row_id"].append(row_id)
        out["pair_index"].append(index)
        out["split"].append(split)
        out["drop_reason"].append(reason)
        out["truncated"].append(bool(t and t.truncated))
        out["boundary_fixed"].append(bool(t and t.boundary_fixed))
        out["prompt_ids"].append(t.prompt_ids if kept else [])
        out["chosen_ids"].append(t.chosen_ids if kept else [])
        out["rejected_ids"].append(t.rejected_ids if kept else [])
        out["chosen_tokens"].append(len(t.chosen_ids) if kept else 0)
        out["rejected_tokens"].append(len(t.rejected_ids) if kept else 0)

    # A row past the size bound is too_long before it is parsed: its text is not even made a
    # Python string (nulled in Arrow), so neither json.loads nor the tokenizer sees it. The others
    # become Python strings one at a time, not a batch (256 rows of up to max_row_bytes) at once.
    text = batch["text"]
    over = pc.greater(pc.binary_length(text), settings.max_row_bytes)
    texts = pc.if_else(over, pa.scalar(None, text.type), text)
    for source, row_id, split, too_long, text in zip(*(batch[c].to_pylist() for c in ("source", "row_id", "split")),
                                                     over.to_pylist(), texts):
        row, reason = parse_row(text.as_py()) if not too_long else (None, TOO_LONG)
        candidates = (normalise_pairs(row, formats.get(source, fmt), columns, ranked_pairs=ranked_pairs,
                                      min_score_margin=min_score_margin)
                      if not reason else [(None, reason)])
        # All pairs of a row share its prompt, so they share its split too.
        prompt = next((pair["prompt"] for pair, _ in candidates if pair is not None), None)
        if prompt is not None and split == "train" and eval_fraction > 0 and _held_out(prompt, seed, eval_fraction):
            split = "eval"
        first: tuple[str, TokenizedPair | None] | None = None  # the first dropped pair, if none is kept
        n_kept = 0
        for pair, reason in candidates:
            t = None
            if pair is not None:
                t = tokenize_pair(tok, pair["prompt"], pair["chosen"], pair["rejected"], settings, chat_template)
                reason = t.drop_reason
            if not reason:
                emit(source, row_id, n_kept, split, "", t)
                n_kept += 1
            elif first is None:
                first = (reason, t)
        if n_kept == 0:
            assert first is not None  # normalise_pairs never returns an empty list
            emit(source, row_id, 0, split, first[0], first[1])
    return pa.table(out, schema=TOKENIZED_SCHEMA)


def _detect_formats(entries: list, split: str, columns: dict[str, str] | None, sample: int,
                    max_row_bytes: int) -> dict[str, str]:
    """Source id -> its row shape, from its first ``sample`` records that parse as JSON (those over
    ``max_row_bytes`` are skipped unparsed, as ``tokenize_batch`` drops them); raises ``DataError``
    naming the source when none has a known shape or they are ambiguous. A source without a
    parseable record is left out (its rows, if any, are counted as dropped)."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in source_items(entries, split):
        by_source[item["source"]].append(item)
    found: dict[str, str] = {}
    for source, items in by_source.items():
        rows: list[Any] = []
        for item in items:
            for record in read_rows(item, max_row_bytes):
                if utf8_size(record["text"]) > max_row_bytes:
                    continue
                row, reason = parse_row(record["text"])
                if reason:
                    continue
                rows.append(row)
                if len(rows) >= sample:
                    break
            if len(rows) >= sample:
                break
        if not rows:
            continue
        try:
            found[source] = source_format(rows, columns)
        except ValueError as e:
            raise DataError(f"data source {source}: {e}") from None
    return found


def tokenized_dataset(
    train_sources: list[str],
    eval_sources: list[str],
    *,
    model_path: str,
    gguf_file: str | None,
    settings: TokenizeSettings,
    eval_fraction: float,
    seed: int,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
    fmt: str = "auto",
    chat_template: str | None = None,
    ranked_pairs: str = "best_worst",
    min_score_margin: float = 0.0,
    detect_rows: int = 64,
) -> ray.data.MaterializedDataset:
    """All rows of all sources, normalised and tokenized, dropped rows included (with reasons);
    a ranked row gives one output row per kept pair (see ``tokenize_batch``).
    ``limit`` keeps the first rows of the train sources and of the eval sources, each.
    ``columns`` renames fields and ``fmt`` fixes the row shape (see ``formats.normalise_pairs``).
    With ``fmt="auto"`` each source's shape is detected here, on the driver, from its first
    ``detect_rows`` records, so a source of unknown or ambiguous shape fails (``DataError``, naming
    the source and the keys seen) before any Ray work; its other rows' shapes are then dropped.
    ``chat_template``: see ``tokenize.chat_template_for``; one that does not compile is a
    ``ValueError`` here (``tokenize.check_chat_template``).

    Returned materialized (see ``materialize``): a worker lost on every try (``stage_retries``) is a
    ``DataWorkerLost`` here, naming this stage, never an endless retry."""
    if fmt != "auto" and fmt not in FORMATS:  # fail here, not in every Ray task
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if chat_template:
        check_chat_template(chat_template)
    if ranked_pairs not in RANKED_PAIRS:
        raise ValueError(f"unknown ranked_pairs {ranked_pairs!r}; known: {', '.join(RANKED_PAIRS)}")
    formats: dict[str, str] = {}
    if fmt == "auto":
        formats = _detect_formats(list(train_sources), "train", columns, detect_rows, settings.max_row_bytes)
        formats |= _detect_formats(list(eval_sources), "eval", columns, detect_rows, settings.max_row_bytes)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same order every run

    def lines(entries: list, split: str) -> ray.data.Dataset:
        # One read task per file, saved-dataset row range or HF split (entries: see sources.py).
        items = source_items(entries, split)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            read_rows, fn_kwargs={"max_chars": settings.max_row_bytes}, **_remote_args())  # no giant line held whole
        ds = ds.limit(limit) if limit else ds
        # A file's rows come out as one block, and one block is one tokenize task: split them, so a
        # single big file is tokenized by every worker (streaming: no barrier, order kept).
        return ds.repartition(target_num_rows_per_block=READ_BLOCK_ROWS)

    raw = lines(train_sources, "train")
    if eval_sources:
        raw = raw.union(lines(eval_sources, "eval"))
    tokenized = raw.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=256,
        **_remote_args(),
        fn_kwargs=dict(
            model_path=model_path,
            gguf_file=gguf_file,
            settings=settings,
            eval_fraction=eval_fraction if not eval_sources else 0.0,
            seed=seed,
            columns=dict(columns) if columns else None,
            fmt=fmt,
            formats=formats,
            chat_template=chat_template,
            ranked_pairs=ranked_pairs,
            min_score_margin=min_score_margin,
        ),
    )
    return materialize(tokenized, TOKENIZE_STAGE, settings)


def build_report(tokenized: ray.data.Dataset) -> DataReport:
    """Tally the small columns of a (materialized) tokenized dataset on the driver. Each input row
    is counted once, on its output row with ``pair_index`` 0 (see ``DataReport``).

    Vectorised: each batch is grouped by (source, split, drop_reason) in Arrow, so the driver's
    Python work is per group, not per row. Groups come in order of first appearance
    (``use_threads=False``), so every dict in the report keeps the order in which its keys first
    occur in the data."""
    report = DataReport()
    per_source: dict[str, Counter] = defaultdict(Counter)
    dropped: Counter = Counter()
    splits: Counter = Counter()
    columns = ["source", "row_id", "pair_index", "split", "drop_reason", "truncated", "boundary_fixed"]
    keys = ["source", "split", "drop_reason"]
    for batch in tokenized.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=65536):
        counted = pa.table({
            **{k: batch[k] for k in keys},
            "first": pc.equal(batch["pair_index"], 0).cast(pa.int64()),  # the first output row of its input row
            "truncated": batch["truncated"].cast(pa.int64()),
            "boundary_fixed": batch["boundary_fixed"].cast(pa.int64()),
        })
        groups = counted.group_by(keys, use_threads=False).aggregate(
            [("first", "count"), ("first", "sum"), ("truncated", "sum"), ("boundary_fixed", "sum")])
        for source, split, reason, rows, first, truncated, fixed in zip(*(groups[c].to_pylist() for c in (
                *keys, "first_count", "first_sum", "truncated_sum", "boundary_fixed_sum"))):
            counts = per_source[source]
            report.truncated += truncated
            report.boundary_fixed += fixed
            counts["truncated"] += truncated
            counts["boundary_fixed"] += fixed
            report.read += first
            counts["read"] += first
            if reason:
                dropped[reason] += rows
                counts[f"dropped/{reason}"] += rows
            else:
                report.pairs += rows
                counts["pairs"] += rows
                splits[split] += rows
                report.kept += first
                counts["kept"] += first
        _add_examples(report.examples, batch)
    report.dropped = dict(dropped)
    report.splits = dict(splits)
    for source, counts in per_source.items():
        report.sources[source] = {
            "read": counts["read"],
            "kept": counts["kept"],
            "pairs": counts["pairs"],
            "truncated": counts["truncated"],
            "boundary_fixed": counts["boundary_fixed"],
            "dropped": {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("dropped/")},
        }
    return report


def _add_examples(examples: dict[str, list[str]], batch: pa.Table, n: int = 3) -> None:
    """Add ``"source:row_id"`` of the first dropped rows of ``batch`` to ``examples`` (reason ->
    at most ``n``, in data order); only the rows of reasons still short of ``n`` reach Python."""
    dropped = batch.filter(pc.not_equal(batch["drop_reason"], ""))
    for reason in pc.unique(dropped["drop_reason"]).to_pylist():
        have = examples.get(reason, [])
        if len(have) >= n:
            continue
        rows = dropped.filter(pc.equal(dropped["drop_reason"], reason)).slice(0, n - len(have))
        examples[reason] = have + [f"{s}:{r}" for s, r in zip(rows["source"].to_pylist(), rows["row_id"].to_pylist())]


LENGTH_PARTS = ("prompt", "chosen", "rejected")
LENGTH_PERCENTILES = (50, 90, 99)


def _lengths(batch: pa.Table) -> pa.Table:
    """Kept rows only -> one int32 column of lengths per part; the driver never sees the ids."""
    kept = batch.filter(pc.equal(batch["drop_reason"], ""))
    return pa.table({part: pc.list_value_length(kept[f"{part}_ids"]).cast(pa.int32()) for part in LENGTH_PARTS})


def length_stats(tokenized: ray.data.Dataset) -> dict[str, dict[str, int | None]]:
    """``{part: {p50, p90, p99, max}}`` in tokens over the kept output rows of a tokenized dataset
    (None everywhere when none is kept). Workers compute the lengths; the driver holds only those."""
    columns = ["drop_reason", *(f"{p}_ids" for p in LENGTH_PARTS)]
    lengths = tokenized.select_columns(columns).map_batches(_lengths, batch_format="pyarrow", batch_size=4096,
                                                            **_remote_args())
    chunks: dict[str, list[np.ndarray]] = {p: [] for p in LENGTH_PARTS}
    for batch in lengths.iter_batches(batch_format="numpy", batch_size=65536):
        for p in LENGTH_PARTS:
            chunks[p].append(np.asarray(batch[p], dtype=np.int64))
    out: dict[str, dict[str, int | None]] = {}
    for p in LENGTH_PARTS:
        values = np.concatenate(chunks[p]) if chunks[p] else np.zeros(0, dtype=np.int64)
        if values.size == 0:
            out[p] = {**{f"p{q}": None for q in LENGTH_PERCENTILES}, "max": None}
            continue
        # inverted_cdf: each percentile is a length that occurs in the data.
        qs = np.percentile(values, LENGTH_PERCENTILES, method="inverted_cdf")
        out[p] = {**{f"p{q}": int(v) for q, v in zip(LENGTH_PERCENTILES, qs)}, "max": int(values.max())}
    return out


def _keep(batch: pa.Table, split: str | None = None) -> pa.Table:
    mask = pc.equal(batch["drop_reason"], "")
    if split is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], split))
    return batch.filter(mask)


def kept_rows(tokenized: ray.data.Dataset, split: str | None = None) -> ray.data.Dataset:
    return tokenized.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"split": split}, **_remote_args())


# Mixing sources by weight. Rule (documented in README): the mixture has N pairs, N = all kept
# train rows together. Weights are relative: each mixture entry's weight over the sum of weights of
# the entries that have kept train rows. Entry g gets n_g of N by largest remainder (the floors of
# N * w_g, then +1 for the largest fractions; ties to the first label in sorted order), so the n_g
# sum to exactly N. With a_g kept rows, n_g = q * a_g + r: every row is used q times and r rows
# once more, the r rows of smallest seeded hash of (source, row_id[, pair_index]). So
# downsampling (q = 0) is a seeded sample without replacement, upsampling repeats whole copies
# plus a sample. Every row is judged by its own hash in map_batches; the driver sees only counts
# per (entry, hash bucket) and the hashes of one bucket per entry. Eval rows pass unchanged.
_MIX_BUCKET_BITS = 8  # 256 hash buckets per entry for finding the r-th smallest hash


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64's finaliser); uint64 arithmetic wraps, as intended."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix_keys(batch: pa.Table, groups: dict[str, str], seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Per row: index into the returned entry labels, a seeded 64-bit hash of (source, row_id
    [, pair_index]), and whether it is a train row. Vectorised: one blake2b per distinct source."""
    encoded = pc.dictionary_encode(batch["source"].combine_chunks())
    names = encoded.dictionary.to_pylist()
    source_hash = np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x1f{s}".encode(), digest_size=8).digest(), "big")
                            for s in names], dtype=np.uint64)
    labels = sorted({groups.get(s, s) for s in names})
    label_of_source = np.array([labels.index(groups.get(s, s)) for s in names], dtype=np.int64)
    index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    with np.errstate(over="ignore"):
        h = _splitmix64(source_hash[index] ^ _splitmix64(batch["row_id"].to_numpy().astype(np.uint64)))
        if "pair_index" in batch.column_names:
            h = _splitmix64(h ^ _splitmix64(batch["pair_index"].to_numpy().astype(np.uint64) + np.uint64(1)))
    train = pc.equal(batch["split"], "train").to_numpy(zero_copy_only=False).astype(bool)
    return label_of_source[index], labels, h, train


def _mix_histogram(batch: pa.Table, groups: dict[str, str], seed: int) -> pa.Table:
    """Train rows per (entry label, hash bucket) of one batch."""
    label, labels, h, train = _mix_keys(batch, groups, seed)
    key = label[train] * (1 << _MIX_BUCKET_BITS) + (h[train] >> np.uint64(64 - _MIX_BUCKET_BITS)).astype(np.int64)
    keys, n = np.unique(key, return_counts=True)
    return pa.table({"label": pa.array([labels[k >> _MIX_BUCKET_BITS] for k in keys.tolist()], pa.string()),
                     "bucket": pa.array(keys & ((1 << _MIX_BUCKET_BITS) - 1), pa.int64()),
                     "n": pa.array(n, pa.int64())})


def _mix_boundary(batch: pa.Table, groups: dict[str, str], seed: int, buckets: dict[str, int]) -> pa.Table:
    """The hashes of the train rows in the one bucket per entry where its cut falls."""
    label, labels, h, train = _mix_keys(batch, groups, seed)
    wanted = np.array([buckets.get(lab, -1) for lab in labels], dtype=np.int64)[label]
    mask = train & ((h >> np.uint64(64 - _MIX_BUCKET_BITS)).astype(np.int64) == wanted)
    return pa.table({"label": pa.array([labels[i] for i in label[mask].tolist()], pa.string()),
                     "hash": pa.array(h[mask], pa.uint64())})


def _mix_select(batch: pa.Table, groups: dict[str, str], seed: int, plan: dict[str, tuple[int, int | None]]) -> pa.Table:
    """Each train row repeated ``q`` times, plus once more when its hash is <= the entry's cut."""
    label, labels, h, train = _mix_keys(batch, groups, seed)
    q = np.array([plan.get(lab, (1, None))[0] for lab in labels], dtype=np.int64)[label]
    has_cut = np.array([plan.get(lab, (1, None))[1] is not None for lab in labels], dtype=bool)[label]
    cut = np.array([plan.get(lab, (1, None))[1] or 0 for lab in labels], dtype=np.uint64)[label]
    copies = np.where(train, q + (has_cut & (h <= cut)), 1)  # eval rows: once
    return batch.take(pa.array(np.repeat(np.arange(len(label)), copies)))


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights``; the parts sum to ``total`` exactly."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    parts = {k: int(v) for k, v in exact.items()}
    by_fraction = sorted(weights, key=lambda k: (-(exact[k] - parts[k]), k))
    for k in by_fraction[: total - sum(parts.values())]:
        parts[k] += 1
    return parts


def mix_sources(
    kept: ray.data.Dataset,
    weights: dict[str, float],
    seed: int,
    groups: dict[str, str] | None = None,
) -> tuple[ray.data.Dataset, dict[str, dict[str, float]]]:
    """Kept rows -> the train rows mixed by ``weights`` (rule above), eval rows unchanged.

    ``weights``: mixture entry -> relative weight > 0 (an entry with none: 1.0); ``groups``: source
    id (the ``source`` column) -> entry, where several sources share one weight (default: each
    source is its own entry). Returns the lazy mixed dataset and ``{entry: {"available": a,
    "used": n, "weight": normalised weight}}``. Deterministic for a seed, whatever the block order.
    """
    bad = {k: w for k, w in weights.items() if not w > 0}
    if bad:
        raise ValueError(f"mixture weights must be > 0: {bad}")
    groups = dict(groups or {})
    buckets: dict[str, Counter] = defaultdict(Counter)
    # batch_size=None: whole blocks, so the driver gets at most 256 counts per entry and block.
    hist = kept.map_batches(_mix_histogram, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"groups": groups, "seed": seed}, **_remote_args())
    for table in hist.iter_batches(batch_format="pyarrow", batch_size=None):
        for lab, b, n in zip(*(table[c].to_pylist() for c in ("label", "bucket", "n"))):
            buckets[lab][b] += n
    available = {lab: sum(c.values()) for lab, c in buckets.items()}
    present = {lab: weights.get(lab, 1.0) for lab in available}  # entries with kept train rows
    used = _largest_remainder(sum(available.values()), present) if present else {}
    norm = sum(present.values())

    # The cut of each entry: its r-th smallest hash, found in the bucket where the count reaches r.
    plan: dict[str, tuple[int, int | None]] = {}
    boundary: dict[str, tuple[int, int]] = {}  # label -> (bucket, rank within it)
    for lab, a in available.items():
        q, r = divmod(used[lab], a)
        plan[lab] = (q, None)
        below = 0
        for b in sorted(buckets[lab]) if r else ():
            if below + buckets[lab][b] >= r:
                boundary[lab] = (b, r - below)
                break
            below += buckets[lab][b]
    if boundary:
        found: dict[str, list[int]] = defaultdict(list)
        edge = kept.map_batches(_mix_boundary, batch_format="pyarrow", batch_size=None, **_remote_args(),
                                fn_kwargs={"groups": groups, "seed": seed, "buckets": {k: b for k, (b, _) in boundary.items()}})
        for table in edge.iter_batches(batch_format="pyarrow", batch_size=None):
            for lab, h in zip(table["label"].to_pylist(), table["hash"].to_pylist()):
                found[lab].append(h)
        for lab, (_, rank) in boundary.items():
            plan[lab] = (plan[lab][0], int(np.sort(np.asarray(found[lab], dtype=np.uint64))[rank - 1]))
    mixed = kept.map_batches(_mix_select, batch_format="pyarrow", **_remote_args(),
                             fn_kwargs={"groups": groups, "seed": seed, "plan": plan})
    counts = {lab: {"available": available.get(lab, 0), "used": used.get(lab, 0),
                    "weight": present[lab] / norm if lab in present else 0.0}
              for lab in sorted(set(weights) | set(available))}
    return mixed, counts
