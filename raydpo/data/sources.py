"""Reading preference sources: every record of every file as ``(row_id, JSON text)``.

Every format goes through JSON text so that one parser (``json.loads`` then ``normalise``) judges
every row, and a row that fails is counted, whatever file it came from. Files are opened through
pyarrow filesystems, so local paths and URIs (``s3://``, ``gs://``, ``file://``) read the same way.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any


def expand_sources(patterns: list[str]) -> list[str]:
    """Local globs are expanded (sorted, so the order is stable); URIs pass through."""
    paths: list[str] = []
    for p in patterns:
        if "://" in p:
            paths.append(p)
            continue
        found = sorted(glob.glob(os.path.expanduser(p)))
        if not found:
            raise FileNotFoundError(f"data source {p!r} matches no file")
        paths.extend(os.path.abspath(f) for f in found)
    return paths


def _filesystem(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def _open_binary(path: str):
    fs, inner = _filesystem(path)
    raw = fs.open_input_stream(inner, compression=None)  # pyarrow would also un-gzip by extension
    return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def _open_text(path: str) -> io.TextIOBase:
    # Invalid UTF-8 becomes U+FFFD instead of failing the file; the row then parses or is counted.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline="")


def _kind(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for ext in (".parquet", ".csv", ".json"):
        if name.endswith(ext):
            return ext[1:]
    return "jsonl"


def _records(path: str) -> Iterator[tuple[int, str]]:
    """``(row_id, JSON text)`` for every record of one file; row ids count from 1 (JSONL: the line).

    Every format goes through JSON text so that one parser (``json.loads`` then ``normalise``)
    judges every row, and a row that fails is counted, whatever file it came from.
    """
    kind = _kind(path)
    if kind == "jsonl":
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield line_no, line
    elif kind == "parquet":
        import pyarrow.parquet as pq

        row_id = 0
        fs, inner = _filesystem(path)
        with pq.ParquetFile(fs.open_input_file(inner)) as pf:  # random access; streamed in batches
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    row_id += 1
                    yield row_id, json.dumps(row, default=str)
    elif kind == "csv":
        import csv

        csv.field_size_limit(2**31 - 1)  # long completions are legal cells
        with _open_text(path) as f:
            for row_id, row in enumerate(csv.DictReader(f), start=1):
                # A row with too many cells puts the extras under None: that is malformed.
                yield row_id, (json.dumps(row) if None not in row else "")
    else:  # a JSON array of rows; read whole (a file of this kind is not streamed)
        with _open_text(path) as f:
            text = f.read()
        try:
            rows = json.loads(text)
        except ValueError:
            rows = None
        if not isinstance(rows, list):
            yield 1, text  # one object is one row; anything else is counted as unparseable
            return
        for row_id, row in enumerate(rows, start=1):
            yield row_id, json.dumps(row)


def read_rows(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One source file -> one row per record: ``{source, row_id, split, text}``."""
    path, split = item["path"], item["split"]
    for row_id, text in _records(path):
        yield {"source": path, "row_id": row_id, "split": split, "text": text}
