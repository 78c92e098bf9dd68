"""Ray Data: read -> normalise -> tokenize -> (reference columns). Returns datasets + a DataReport.

Reading is line-based, so one malformed line is one dropped, counted row, never a failed job.
Every row read is accounted for: ``kept + sum(dropped) == read``.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from raydpo.data.formats import FORMATS, UNPARSEABLE, normalise
from raydpo.data.sources import expand_sources, read_rows
from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
from raydpo.models import load_tokenizer

TOKENIZED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_id", pa.int64()),
        ("split", pa.string()),  # "train" | "eval"
        ("drop_reason", pa.string()),  # "" when kept
        ("truncated", pa.bool_()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
)
TRAIN_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class DataReport:
    """What happened to every row read."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first 3 "source:row_id"
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)  # kept rows per split

    @property
    def drop_fraction(self) -> float:
        return (self.read - self.kept) / self.read if self.read else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "examples": self.examples,
            "sources": self.sources,
            "splits": self.splits,
        }

    def summary(self) -> str:
        lines = [f"data: read {self.read}, kept {self.kept}, truncated {self.truncated}"]
        lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items())))
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


class DataError(RuntimeError):
    """The input is too broken to train on; the message carries the report."""


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
) -> pa.Table:
    """Normalise and tokenize a batch of raw lines; every input row gives one output row.
    ``columns`` and ``fmt`` go to ``normalise`` (field renames; ``"auto"`` or a fixed row shape)."""
    tok = _tokenizer(model_path, gguf_file)
    out: dict[str, list] = {name: [] for name in TOKENIZED_SCHEMA.names}
    for source, row_id, split, text in zip(*(batch[c].to_pylist() for c in ("source", "row_id", "split", "text"))):
        try:
            row = json.loads(text)
        except ValueError:
            row = None
        pair, reason = normalise(row, fmt, columns) if row is not None else (None, UNPARSEABLE)
        tokenized = None
        if pair is not None:
            tokenized = tokenize_pair(tok, pair["prompt"], pair["chosen"], pair["rejected"], settings)
            reason = tokenized.drop_reason
            if split == "train" and eval_fraction > 0 and _held_out(pair["prompt"], seed, eval_fraction):
                split = "eval"
        kept = tokenized is not None and not reason
        out["source"].append(source)
        out["row_id"].append(row_id)
        out["split"].append(split)
        out["drop_reason"].append(reason)
        out["truncated"].append(bool(tokenized and tokenized.truncated))
        out["prompt_ids"].append(tokenized.prompt_ids if kept else [])
        out["chosen_ids"].append(tokenized.chosen_ids if kept else [])
        out["rejected_ids"].append(tokenized.rejected_ids if kept else [])
        out["chosen_tokens"].append(len(tokenized.chosen_ids) if kept else 0)
        out["rejected_tokens"].append(len(tokenized.rejected_ids) if kept else 0)
    return pa.table(out, schema=TOKENIZED_SCHEMA)


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
) -> ray.data.Dataset:
    """All rows of all sources, normalised and tokenized, dropped rows included (with reasons).
    ``limit`` keeps the first rows of the train sources and of the eval sources, each.
    ``columns`` renames fields and ``fmt`` fixes the row shape (see ``formats.normalise``)."""
    if fmt != "auto" and fmt not in FORMATS:  # fail here, not in every Ray task
        raise ValueError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same order every run

    def lines(paths: list[str], split: str) -> ray.data.Dataset:
        items = [{"path": p, "split": split} for p in expand_sources(paths)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_rows)
        return ds.limit(limit) if limit else ds

    raw = lines(train_sources, "train")
    if eval_sources:
        raw = raw.union(lines(eval_sources, "eval"))
    return (
        raw.map_batches(
            tokenize_batch,
            batch_format="pyarrow",
            batch_size=256,
            fn_kwargs=dict(
                model_path=model_path,
                gguf_file=gguf_file,
                settings=settings,
                eval_fraction=eval_fraction if not eval_sources else 0.0,
                seed=seed,
                columns=dict(columns) if columns else None,
                fmt=fmt,
            ),
        )
    )


def build_report(tokenized: ray.data.Dataset) -> DataReport:
    """Tally the small columns of a (materialized) tokenized dataset on the driver."""
    report = DataReport()
    per_source: dict[str, Counter] = defaultdict(Counter)
    dropped: Counter = Counter()
    splits: Counter = Counter()
    columns = ["source", "row_id", "split", "drop_reason", "truncated"]
    for batch in tokenized.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=4096):
        for source, row_id, split, reason, truncated in zip(*(batch[c].to_pylist() for c in columns)):
            report.read += 1
            report.truncated += bool(truncated)
            counts = per_source[source]
            counts["read"] += 1
            counts["truncated"] += bool(truncated)
            if reason:
                dropped[reason] += 1
                counts[f"dropped/{reason}"] += 1
                examples = report.examples.setdefault(reason, [])
                if len(examples) < 3:
                    examples.append(f"{source}:{row_id}")
            else:
                report.kept += 1
                counts["kept"] += 1
                splits[split] += 1
    report.dropped = dict(dropped)
    report.splits = dict(splits)
    for source, counts in per_source.items():
        report.sources[source] = {
            "read": counts["read"],
            "kept": counts["kept"],
            "truncated": counts["truncated"],
            "dropped": {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("dropped/")},
        }
    return report


def _keep(batch: pa.Table, split: str | None = None) -> pa.Table:
    mask = pc.equal(batch["drop_reason"], "")
    if split is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], split))
    return batch.filter(mask)


def kept_rows(tokenized: ray.data.Dataset, split: str | None = None) -> ray.data.Dataset:
    return tokenized.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"split": split})


def with_reference(
    kept: ray.data.Dataset,
    *,
    model_path: str,
    gguf_file: str | None,
    dtype: str,
    num_actors: int,
    num_cpus: float,
    num_gpus: float,
    batch_size: int,
) -> ray.data.Dataset:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` from an actor pool of reference models."""
    from actors.reference import ReferenceLogps

    return kept.map_batches(
        ReferenceLogps,
        fn_constructor_kwargs=dict(model_path=model_path, gguf_file=gguf_file, dtype=dtype),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
