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

A source that cannot be read or decoded fails as a whole with a ``SourceError`` (an ``InputError``:
the job prints its one line, naming the source and the cause, and exits 2), never a traceback or a
silent loss of rows. What the first bytes of a file tell is checked on the driver, before any Ray
work, for every local file (``check_file``): it exists, is a regular file (not a folder, FIFO,
device or socket) and can be read; it is not empty; gzip is told by its magic bytes (``1f 8b``),
whatever the name; a Parquet file has its magic bytes and a footer that parses; text is UTF-8,
or UTF-8/UTF-16/UTF-32 with a byte-order mark (decoded as the mark says), and text that looks like
UTF-16 or UTF-32 without a mark fails naming that encoding. A remote object gets the same checks in
its read task. What only reading finds fails the read task (and so the run): an I/O error, a gzip
stream that is truncated or corrupt (after line N: the rest of the file is lost, and training on an
unknown loss is not an option), a JSON array with a syntax error (line, column), a source with no
rows (blank lines only, a CSV header only, ``[]``). Invalid UTF-8 bytes inside otherwise UTF-8 text
become U+FFFD, and the row is judged by the parser like any other.
"""
from __future__ import annotations

import codecs
import contextlib
import fnmatch
import glob
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raydpo.data.formats import is_valid_text
from raydpo.errors import InputError

GLOB_CHARS = "*?["


class SourceError(InputError, ValueError):
    """A data source that cannot be read or decoded, or that holds no rows. The message names the
    source (path or URI), the cause and what to do. A ``ValueError`` too, as these errors were
    before, so a caller that caught those still does."""


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


def _loaded(source: str, load: Callable[[], Any]) -> Any:
    """``load()``, a ``datasets`` call, or a ``SourceError`` naming the source. ``datasets`` raises
    many kinds of error for a source it cannot load (not found, an unknown split, a damaged file as
    DatasetGenerationError or ArrowInvalid, even an IndexError for a saved dataset of no rows), so
    any error from that one call is the source's."""
    try:
        return load()
    except Exception as e:
        raise SourceError(f"data source {source}: cannot be loaded ({type(e).__name__}: {_cause(e)})") from None


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
        raise SourceError(f"data source {pattern!r} matches no file")
    for path in found:
        # A name of non-UTF-8 bytes comes back with lone surrogates, which no Arrow column (the read
        # items, the report's source ids) can hold: fail here, naming it, not inside Ray.
        if not is_valid_text(path):
            raise SourceError(f"data source {path!r}: the file name is not valid UTF-8; rename the file")
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
            raise SourceError(f"data source {folder}: a saved DatasetDict with splits {', '.join(splits)}; "
                             f"choose one with split: NAME" + (f" (not {chosen!r})" if chosen else ""))
        folder = os.path.join(folder, chosen)  # where save_to_disk puts that split
    elif spec.get("split"):
        raise SourceError(f"data source {folder}: a saved Dataset has no splits; remove split ({spec['split']!r})")
    datasets = _datasets(folder)
    rows = _loaded(folder, lambda: datasets.load_from_disk(folder)).num_rows  # memory-mapped: reads no rows
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
                raise SourceError(f"data source {path!r} is a folder but not a datasets save_to_disk folder; "
                                 f"name its files (e.g. {path.rstrip('/')}/*.jsonl)")
            items += _saved_items(os.path.abspath(local), spec, split)
        elif "split" in spec:
            raise ValueError(f"data source {path!r}: split is for hf sources and save_to_disk folders only")
        else:
            check_file(path)  # fails here, on the driver, before any Ray work
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


# --- what a file is, from its first bytes ----------------------------------------------------------

_HEAD_BYTES = 4096  # decoded bytes that decide the encoding (and show Parquet inside a gzip)
_RAW_HEAD_BYTES = 16384  # raw bytes read for that: even a gzip of random bytes gives 4 KiB from them
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
# (mark, codec): the codec drops the mark, and utf-16 / utf-32 take the byte order from it. UTF-32
# LE's mark begins with UTF-16 LE's, so it is tried first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Formats that no reader here understands, by their magic bytes: the user hears what the file is,
# rather than seeing its bytes counted as unparseable rows (or a source without rows left out).
_FOREIGN = (
    (re.compile(rb"PK\x03\x04"), "a zip archive (an .xlsx workbook is one); export its rows as JSONL, CSV or Parquet"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2-compressed; decompress it, or compress it with gzip"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz-compressed; decompress it, or compress it with gzip"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd-compressed; decompress it, or compress it with gzip"),
    (re.compile(rb"7z\xbc\xaf\x27\x1c"), "a 7z archive; extract its files and name those"),
    (re.compile(rb".{257}ustar(\x0000|  \x00)", re.DOTALL), "a tar archive; extract its files and name those"),
)
_NOT_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


@dataclass(frozen=True)
class _Layout:
    """How to read one file: from its name (the kind) and its first bytes (all the rest)."""

    kind: str  # "jsonl", "json" (an array), "csv" or "parquet"
    gzip: bool  # gzip-compressed, told by the magic bytes whatever the name says
    encoding: str  # text codec: "utf-8" (invalid bytes become U+FFFD), "utf-8-sig", "utf-16", "utf-32"


def _kind(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for ext in (".parquet", ".csv", ".json"):
        if name.endswith(ext):
            return ext[1:]
    return "jsonl"


def _check_regular(path: str, local: str) -> None:
    """A ``SourceError`` unless ``local`` is a regular file (a link to one is): opening a FIFO would
    wait for a writer forever, and a device never ends."""
    try:
        mode = os.stat(local).st_mode
    except OSError as e:  # a broken link, a loop of links, a folder on the way that may not be entered
        raise SourceError(f"data source {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _NOT_FILES if test(mode)), "a special file")
        raise SourceError(f"data source {path}: is {what}, not a regular file; name a file of rows")


def _cause(e: BaseException) -> str:
    """An error's text on one line (pyarrow's may span several), for a message of one line."""
    return " ".join(str(e).split())


def _read_head(path: str) -> bytes:
    local = _local_path(path)
    try:
        if local is not None:  # Python's own error says it shortest ("Permission denied"); pyarrow's repeats the path
            with open(local, "rb") as f:
                return f.read(_RAW_HEAD_BYTES)
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner, compression=None) as f:
            return f.read(_RAW_HEAD_BYTES)
    except OSError as e:  # permission denied, an I/O error, a missing object
        raise SourceError(f"data source {path}: cannot be read ({e.strerror or _cause(e)})") from None


def _gunzip_head(path: str, raw: bytes) -> bytes:
    """The first decompressed bytes of a gzip file (a stream cut short gives what it holds). Damage
    this near the start fails here, on the driver; a small file is checked whole, its CRC included."""
    decompressor = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer around the data
    try:
        head = decompressor.decompress(raw, _HEAD_BYTES)
    except zlib.error as e:
        raise SourceError(f"data source {path}: is not a valid gzip stream ({_cause(e)}); re-create or "
                          f"re-download it") from None
    if not head and decompressor.eof:
        raise SourceError(f"data source {path}: is empty (a gzip of no bytes); remove it from the sources or fill it")
    return head  # empty and not at its end: truncated before its first byte, which reading reports


def _wide_encoding(head: bytes) -> str | None:
    """The encoding that text without a byte-order mark looks like when its NUL bytes fall where
    UTF-16 or UTF-32 puts them for JSON or CSV (mostly ASCII: ``{\0"\0p\0``), else None. UTF-8 text
    has a NUL only where a row holds one (that row is then judged by the parser), never at every
    second or fourth byte. The guess is confirmed by decoding: the text must then read as rows do,
    beginning with ``{``, ``[``, a quote or a letter (a CSV header), so UTF-8 rows among lines of
    NUL bytes stay rows."""
    n = len(head) - len(head) % 4
    if n < 64:  # a few bytes prove nothing: two short lines of b"\0" would look like UTF-16 BE
        return None
    nul = [head[i:n:4].count(0) / (n // 4) for i in range(4)]  # the share of NUL bytes at each offset mod 4
    odd, even = (nul[1] + nul[3]) / 2, (nul[0] + nul[2]) / 2
    guesses = (("UTF-32 LE", "utf-32-le", nul[2] > 0.9 and nul[3] > 0.9 and nul[0] < 0.5),  # below U+10000: two NULs on top
               ("UTF-32 BE", "utf-32-be", nul[0] > 0.9 and nul[1] > 0.9 and nul[3] < 0.5),
               ("UTF-16 LE", "utf-16-le", odd > 0.2 and even < 0.05),
               ("UTF-16 BE", "utf-16-be", even > 0.2 and odd < 0.05))
    for name, codec, looks in guesses:
        if looks:
            text = head[:n].decode(codec, errors="replace").lstrip()
            return name if text[:1] in ('{', '[', '"') or text[:1].isascii() and text[:1].isalpha() else None
    return None


def _layout(path: str) -> _Layout:
    """How to read ``path``, or a ``SourceError`` where its first bytes already show that it cannot
    be read: not a regular file, unreadable, empty, a format no reader here knows, a Parquet file
    without its magic bytes, or text in UTF-16/UTF-32 without a byte-order mark."""
    local = _local_path(path)
    if local is not None:
        _check_regular(path, local)  # before opening it
    raw = _read_head(path)
    if not raw:
        raise SourceError(f"data source {path}: is empty (0 bytes); remove it from the sources or fill it")
    compressed = raw.startswith(_GZIP_MAGIC)
    head = _gunzip_head(path, raw) if compressed else raw[:_HEAD_BYTES]
    for magic, what in _FOREIGN:
        if magic.match(raw) or magic.match(head):  # a .tar.gz is a tar inside a gzip
            raise SourceError(f"data source {path}: is {what}")
    if compressed and head.startswith(_GZIP_MAGIC):
        raise SourceError(f"data source {path}: is compressed twice (a gzip inside a gzip); decompress it once")
    kind = _kind(path)
    if kind == "parquet" or head.startswith(_PARQUET_MAGIC):
        if compressed:
            raise SourceError(f"data source {path}: is a gzip-compressed Parquet file; decompress it "
                              f"(Parquet compresses its own pages)")
        if not raw.startswith(_PARQUET_MAGIC):
            raise SourceError(f"data source {path}: is not a Parquet file (it does not begin with the bytes PAR1): "
                              f"truncated, or another format; re-write or re-download it")
        return _Layout("parquet", False, "")
    for mark, codec in _BOMS:
        if head.startswith(mark):
            return _Layout(kind, compressed, codec)
    wide = _wide_encoding(head)
    if wide:
        raise SourceError(f"data source {path}: looks like {wide} text without a byte-order mark (NUL bytes "
                          f"between its characters), which cannot be decoded for sure; save it as UTF-8")
    return _Layout(kind, compressed, "utf-8")


def _check_parquet_footer(path: str) -> None:
    """Parse the footer of a Parquet file (it reads no rows): a truncated or damaged file fails here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner = _filesystem(path)
    try:
        with fs.open_input_file(inner) as f:
            rows = pq.read_metadata(f).num_rows
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"data source {path}: is not a readable Parquet file ({_cause(e)}): truncated or damaged; "
                          f"re-write or re-download it") from None
    if rows == 0:
        raise SourceError(f"data source {path}: holds no rows (a Parquet file of 0 rows); remove it from the sources")


def check_file(path: str) -> None:
    """Raise a ``SourceError`` when the local file ``path`` names (a path or ``file://`` URI) cannot
    be read as a source, as far as its first bytes tell (see ``_layout``) and, for Parquet, its
    footer. Costs a stat, one open and a read of 16 KiB (plus the footer). A remote URI is left to
    its read task, which makes the same checks before reading. A file found good is not read
    again while its size and modification time stay the same: the driver resolves the sources
    several times a run (the pre-Ray check, the format detection, the mixture, the read items)."""
    local = _local_path(path)
    if local is None:
        return
    try:
        st = os.stat(local)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        stamp = None  # _layout says why, naming the file
    if stamp is not None and _CHECKED.get(path) == stamp:
        return
    if _layout(path).kind == "parquet":
        _check_parquet_footer(path)
    if stamp is not None:
        _CHECKED[path] = stamp


_CHECKED: dict[str, tuple[int, int, int]] = {}  # path -> (size, mtime_ns, inode) of a file check_file found good


# --- reading -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_text(path: str, layout: _Layout) -> Iterator[io.TextIOBase]:
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner, compression=None) as raw:  # pyarrow would un-gzip by the name alone
        binary = gzip.GzipFile(fileobj=raw) if layout.gzip else raw
        # Invalid UTF-8 becomes U+FFFD instead of failing the file; the row then parses or is counted.
        yield io.TextIOWrapper(binary, encoding=layout.encoding, errors="replace", newline="")


def _json_syntax_error(path: str, text: str, e: json.JSONDecodeError) -> str:
    near = text[max(e.pos - 30, 0): e.pos + 30]
    hint = "; a file of one JSON object per line is JSONL: name it .jsonl" if e.msg == "Extra data" else "; fix the file"
    return (f"data source {path}: not valid JSON at line {e.lineno}, column {e.colno} (character {e.pos}): "
            f"{e.msg}, near {near!r}{hint}")


_SKIP_CHARS = 1 << 20  # the rest of an over-long line is read past in pieces of this many characters


def _bounded_lines(f: io.TextIOBase, max_chars: int | None) -> Iterator[str]:
    """The lines of ``f``; a line longer than ``max_chars`` characters comes out as its first
    ``max_chars + 1`` only, and the rest of it is read past without being held, so one giant line
    (a multi-GB record) never takes more memory than the bound. What comes out is still over the
    bound, so the tokenize stage drops the row as ``too_long``."""
    if max_chars is None:
        yield from f
        return
    while line := f.readline(max_chars + 1):
        if len(line) > max_chars and not line.endswith(("\n", "\r")):
            while (rest := f.readline(_SKIP_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
        yield line


def _records(path: str, layout: _Layout, max_chars: int | None = None) -> Iterator[tuple[int, str]]:
    """``(row_id, JSON text)`` for every record of one file; row ids count from 1 (JSONL: the line).

    Every format goes through JSON text so that one parser (``json.loads`` then ``normalise``)
    judges every row, and a row that fails is counted, whatever file it came from. A JSONL line
    past ``max_chars`` is cut there (``_bounded_lines``); the other formats are read whole.
    """
    if layout.kind == "jsonl":
        with _open_text(path, layout) as f:
            for line_no, line in enumerate(_bounded_lines(f, max_chars), start=1):
                if line.strip():
                    yield line_no, line
    elif layout.kind == "parquet":
        import pyarrow.parquet as pq

        row_id = 0
        fs, inner = _filesystem(path)
        with fs.open_input_file(inner) as f, pq.ParquetFile(f) as pf:  # random access; streamed in batches
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    row_id += 1
                    yield row_id, json.dumps(row, default=str)
    elif layout.kind == "csv":
        import csv

        csv.field_size_limit(2**31 - 1)  # long completions are legal cells
        with _open_text(path, layout) as f:
            for row_id, row in enumerate(csv.DictReader(f), start=1):
                # A row with too many cells puts the extras under None: that is malformed.
                yield row_id, (json.dumps(row) if None not in row else "")
    else:  # a JSON array of rows; read whole (a file of this kind is not streamed)
        with _open_text(path, layout) as f:
            text = f.read()
        if not text.strip():
            return  # no rows: read_rows says so
        try:
            rows = json.loads(text)
        except RecursionError:
            # Nesting past the parser's stack: one row, which the parser drops as too_deeply_nested.
            yield 1, text
            return
        except json.JSONDecodeError as e:
            # The whole source fails, naming the place. A syntax error inside an array leaves the
            # rest of the file unknown (a missing comma, a cut, a stray quote): keeping the elements
            # before it would train on a prefix nobody chose, and how many rows are lost cannot be
            # counted without guessing where elements end. datasets.load_dataset("json"), what TRL
            # users load such files with, also fails the whole file.
            raise SourceError(_json_syntax_error(path, text, e)) from None
        if not isinstance(rows, list):
            yield 1, text  # one object is one row; any other value one row the parser drops
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


def _read_failure(source: str, e: BaseException, where: str) -> str:
    """The message for an error met while reading ``source``, ``where`` (after line/row N) it happened."""
    lost = "the rest of the file is lost (how many rows is unknown); re-create or re-download it"
    if isinstance(e, EOFError):  # what gzip raises at the end of a stream cut short
        return f"data source {source}: the gzip stream is truncated {where}: {lost}"
    if isinstance(e, (zlib.error, gzip.BadGzipFile)):  # a damaged block, a wrong CRC or length
        return f"data source {source}: the gzip stream is corrupt {where} ({_cause(e)}): {lost}"
    return (f"data source {source}: reading failed {where} ({_cause(e)}); the rest was not read: re-write or "
            f"re-download it, or check its storage, then run again")


def read_rows(item: dict[str, Any], max_chars: int | None = None) -> Iterator[dict[str, Any]]:
    """One read item (``source_items``) -> one row per record: ``{source, row_id, split, text}``.
    ``max_chars``: a JSONL line longer than this comes out cut to one character past it (the
    tokenize stage's ``TokenizeSettings.max_row_bytes``: it then drops the row as ``too_long``), so
    a read task never holds a giant line whole.

    Raises a ``SourceError`` naming the source when it cannot be read (see the module's notes),
    when reading fails part way (saying after which line or row), or when it holds no rows."""
    import pyarrow as pa

    kind, source = item.get("kind") or "file", item.get("source") or item["path"]
    unit = "row"
    if kind == "file":
        layout = _layout(item["path"])  # again here: a remote object is first seen by its read task
        unit = "line" if layout.kind == "jsonl" else "row"
        records = _records(item["path"], layout, max_chars)
    elif kind == "saved":
        datasets = _datasets(source)
        ds = _loaded(source, lambda: datasets.load_from_disk(item["path"]))
        records = _dataset_records(ds.select(range(item["start"], item["stop"])), item["start"] + 1)
    else:
        datasets = _datasets(source)
        ds = _loaded(source, lambda: datasets.load_dataset(item["name"], item["subset"], split=item["hf_split"],
                                                           revision=item["revision"]))
        records = _dataset_records(ds, 1)
    last = count = 0
    try:
        for last, text in records:
            count += 1
            yield {"source": source, "row_id": last, "split": item["split"], "text": text}
    except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
        where = f"after {unit} {last}" if count else "before its first row"
        raise SourceError(_read_failure(source, e, where)) from None
    if count == 0:
        raise SourceError(f"data source {source}: holds no rows (only blank lines, a CSV header alone, an empty "
                          f"JSON array or table); remove it from the sources or fill it")
