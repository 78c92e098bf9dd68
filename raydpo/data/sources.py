"""Reading preference sources: every record of every source as ``(row_id, JSON text)``.

Every format goes through JSON text so that one parser (``json.loads`` then ``normalise``) judges
every row, and a row that fails is counted, whatever it came from. Files are opened through pyarrow
filesystems, so local paths and URIs (``s3://``, ``gs://``, ``file://``) read the same way.

A source entry (one item of ``data.train`` / ``data.eval``) is either a string or a mapping:

- ``"path"`` or ``{path: ...}``: a file (.jsonl, .json array, .csv, each optionally .gz; .parquet),
  a glob (local, or over a URI: ``file:///data/*.jsonl``, ``s3://bucket/shards/*.parquet``;
  ``**`` searches sub-folders), a URI, or a local folder written by ``datasets``' ``save_to_disk``
  (a ``Dataset``, or a ``DatasetDict`` with ``split`` choosing one of its splits).
- ``{hf: NAME, subset: CONFIG, split: "train", revision: REV}``: ``datasets.load_dataset``.

Either may carry ``weight`` (see ``mixture_weights``). Each entry resolves to read *items*, one Ray
read task each (a file, a row range of a saved dataset, or one Hugging Face split), with a readable
``source`` id: the file path or URI, the saved folder (``folder/split`` for a DatasetDict), or
``hf:NAME[/subset]:split[@revision]``. Row ids count from 1 within a source.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from raydpo.data.formats import is_valid_text

GLOB_CHARS = "*?["
ROWS_PER_READ_TASK = 100_000  # a saved dataset is read by several tasks, each this many rows
_SAVED_DATASET = ("state.json", "dataset_info.json")  # what save_to_disk writes for a Dataset
_SAVED_DATASET_DICT = "dataset_dict.json"  # ... and for a DatasetDict (plus one folder per split)


def _spec(entry: Any) -> dict[str, Any]:
    """A source entry as a plain dict: a string is ``{path: s}``; a mapping or a pydantic model
    (``config.SourceSpec``) loses its unset keys."""
    if isinstance(entry, str):
        return {"path": entry}
    if hasattr(entry, "model_dump"):
        entry = entry.model_dump(exclude_none=True)
    if not isinstance(entry, Mapping):
        raise TypeError(f"data source {entry!r}: expected a path or a mapping with path or hf")
    spec = {k: v for k, v in entry.items() if v is not None}
    if ("path" in spec) == ("hf" in spec):
        raise ValueError(f"data source {spec}: give exactly one of path or hf")
    return spec


def _datasets(label: str):
    """The optional ``datasets`` package, or an error that says which source needs it."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data source {label}: reading Hugging Face datasets needs the `datasets` "
                          f"package (pip install 'raydpo[hf]')") from None
    return datasets


def _glob_uri(uri: str) -> list[str]:
    """A glob over a URI, through its pyarrow filesystem: the folder before the first wildcard is
    listed (with its sub-folders when the pattern has ``**``) and its files matched by ``fnmatch``."""
    import pyarrow.fs as pafs

    cut = min(uri.find(c) for c in GLOB_CHARS if c in uri)
    base_uri = uri[:cut].rsplit("/", 1)[0]  # "s3://bucket/shards", "file:///data"
    fs, base = pafs.FileSystem.from_uri(base_uri)
    base = base.rstrip("/")
    pattern = base + uri[len(base_uri):]
    infos = fs.get_file_info(pafs.FileSelector(base or "/", recursive="**" in pattern, allow_not_found=True))
    return sorted(base_uri + i.path[len(base):] for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern))


def _local_path(path: str) -> str | None:
    """The local path a plain path or ``file://`` URI names; None for other URIs."""
    if "://" not in path:
        return path
    if path.startswith("file://"):
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(path)[1]
    return None


def _expand_path(pattern: str) -> list[str]:
    """Files and folders a path, glob or URI names (sorted, so the order is stable)."""
    if "://" in pattern and any(c in pattern for c in GLOB_CHARS):
        found = _glob_uri(pattern)
    elif "://" in pattern:
        local = _local_path(pattern)  # a file:// URI is checked here; remote ones when read
        found = [pattern] if local is None or os.path.exists(local) else []
    else:
        found = [os.path.abspath(f) for f in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not found:
        raise FileNotFoundError(f"data source {pattern!r} matches no file")
    for path in found:
        # A name of non-UTF-8 bytes comes back with lone surrogates, which no Arrow column (the read
        # items, the report's source ids) can hold: fail here, naming it, not inside Ray.
        if not is_valid_text(path):
            raise ValueError(f"data source {path!r}: the file name is not valid UTF-8; rename the file")
    return found


def _item(source: str, split: str, kind: str, **fields: Any) -> dict[str, Any]:
    """One read task. Every item has every key (None when unused): they become one Arrow table."""
    base = {"path": None, "name": None, "subset": None, "hf_split": None, "revision": None, "start": None, "stop": None}
    return {"source": source, "split": split, "kind": kind, **base, **fields}


def _saved_items(folder: str, spec: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """A ``save_to_disk`` folder -> row ranges of ``ROWS_PER_READ_TASK``, so big ones read in parallel."""
    if os.path.exists(os.path.join(folder, _SAVED_DATASET_DICT)):
        with open(os.path.join(folder, _SAVED_DATASET_DICT)) as f:
            splits = json.load(f)["splits"]
        chosen = spec.get("split") or (splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise ValueError(f"data source {folder}: a saved DatasetDict with splits {', '.join(splits)}; "
                             f"choose one with split: NAME" + (f" (not {chosen!r})" if chosen else ""))
        folder = os.path.join(folder, chosen)  # where save_to_disk puts that split
    elif spec.get("split"):
        raise ValueError(f"data source {folder}: a saved Dataset has no splits; remove split ({spec['split']!r})")
    rows = _datasets(folder).load_from_disk(folder).num_rows  # memory-mapped: reads no rows
    return [_item(folder, split, "saved", path=folder, start=start, stop=min(start + ROWS_PER_READ_TASK, rows))
            for start in range(0, max(rows, 1), ROWS_PER_READ_TASK)]


def _entry_items(spec: dict[str, Any], split: str) -> list[dict[str, Any]]:
    if "hf" in spec:
        name, subset, revision = spec["hf"], spec.get("subset"), spec.get("revision")
        hf_split = spec.get("split", "train")
        source = f"hf:{name}" + (f"/{subset}" if subset else "") + f":{hf_split}" + (f"@{revision}" if revision else "")
        _datasets(source)  # fail on the driver, before any Ray task, when the package is missing
        return [_item(source, split, "hf", name=name, subset=subset, hf_split=hf_split, revision=revision)]
    for key in ("subset", "revision"):
        if key in spec:
            raise ValueError(f"data source {spec['path']!r}: {key} is for hf sources only")
    items: list[dict[str, Any]] = []
    for path in _expand_path(spec["path"]):
        local = _local_path(path)
        if local is not None and os.path.isdir(local):
            if not (os.path.exists(os.path.join(local, _SAVED_DATASET_DICT))
                    or all(os.path.exists(os.path.join(local, m)) for m in _SAVED_DATASET)):
                raise ValueError(f"data source {path!r} is a folder but not a datasets save_to_disk folder; "
                                 f"name its files (e.g. {path.rstrip('/')}/*.jsonl)")
            items += _saved_items(os.path.abspath(local), spec, split)
        elif "split" in spec:
            raise ValueError(f"data source {path!r}: split is for hf sources and save_to_disk folders only")
        else:
            items.append(_item(path, split, "file", path=path))
    return items


_KEYS = {"path", "hf", "subset", "split", "revision", "weight"}


def resolve_sources(entries: Sequence[Any], split: str) -> list[tuple[str, float | None, list[dict[str, Any]]]]:
    """Each entry -> ``(label, weight, read items)``. The label names the entry in the mixture: its
    one source id, or the pattern as written when it matched several sources."""
    out = []
    for entry in entries:
        spec = _spec(entry)
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ValueError(f"data source {spec}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        items = _entry_items(spec, split)
        ids = list(dict.fromkeys(i["source"] for i in items))
        label = ids[0] if len(ids) == 1 else spec["path"]
        out.append((label, spec.get("weight"), items))
    return out


def source_items(entries: Sequence[Any], split: str) -> list[dict[str, Any]]:
    """The read items of all entries, in order: one Ray read task each (see ``read_rows``)."""
    return [item for _, _, items in resolve_sources(entries, split) for item in items]


def expand_sources(entries: Sequence[Any]) -> list[str]:
    """The source ids the entries name (globs expanded, sorted); raises before any reading when
    one names nothing, is a plain folder, or needs a missing package."""
    return list(dict.fromkeys(i["source"] for i in source_items(entries, "train")))


def mixture_weights(entries: Sequence[Any]) -> tuple[dict[str, float], dict[str, str]] | None:
    """``(weights, groups)`` for ``pipeline.mix_sources``, or None when no entry has a weight.

    ``weights``: entry label -> weight (1.0 where none is given); ``groups``: source id -> entry
    label, so the files of one glob entry share its weight in their own proportions. A source named
    by two entries is an error here: its rows could not be counted against one weight.
    """
    resolved = resolve_sources(entries, "train")
    if all(weight is None for _, weight, _ in resolved):
        return None
    weights: dict[str, float] = {}
    groups: dict[str, str] = {}
    owner: dict[str, int] = {}
    for index, (label, weight, items) in enumerate(resolved):
        for item in items:
            if owner.setdefault(item["source"], index) != index:
                raise ValueError(f"data.train.{index}: source {item['source']!r} is also in "
                                 f"data.train.{owner[item['source']]}; with weights a source belongs to one entry")
            groups[item["source"]] = label
        weights[label] = 1.0 if weight is None else float(weight)
    return weights, groups


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
        line_no = 0
        with _open_text(path) as f:
            try:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        yield line_no, line
            except (EOFError, zlib.error, gzip.BadGzipFile):
                # A truncated or corrupt .gz: the lines before the damage are rows; the rest is one
                # unparseable row (at the next line number), so the report shows it, not a crash.
                yield line_no + 1, ""
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
        except (ValueError, RecursionError):
            rows = None
        if not isinstance(rows, list):
            # One object is one row; anything else is one dropped row, whose reason the parser gives
            # again (unparseable, or too_deeply_nested where the nesting exhausted its stack).
            yield 1, text
            return
        for row_id, row in enumerate(rows, start=1):
            yield row_id, json.dumps(row)


def _dataset_records(ds: Any, first_row_id: int) -> Iterator[tuple[int, str]]:
    """A ``datasets.Dataset`` streamed as Arrow batches (memory-mapped), one JSON text per row."""
    row_id = first_row_id - 1
    for table in ds.with_format("arrow").iter(batch_size=1024):
        for row in table.to_pylist():
            row_id += 1
            yield row_id, json.dumps(row, default=str)  # default=str: dates, bytes, ... stay a row


def read_rows(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One read item (``source_items``) -> one row per record: ``{source, row_id, split, text}``."""
    kind, source = item.get("kind") or "file", item.get("source") or item["path"]
    if kind == "file":
        records = _records(item["path"])
    elif kind == "saved":
        ds = _datasets(source).load_from_disk(item["path"])
        records = _dataset_records(ds.select(range(item["start"], item["stop"])), item["start"] + 1)
    else:
        ds = _datasets(source).load_dataset(item["name"], item["subset"], split=item["hf_split"], revision=item["revision"])
        records = _dataset_records(ds, 1)
    for row_id, text in records:
        yield {"source": source, "row_id": row_id, "split": item["split"], "text": text}
