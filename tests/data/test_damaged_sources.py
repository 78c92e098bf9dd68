"""Sources that cannot be read or decoded (issue 26): each fails as a whole with one ``SourceError``
naming the source and the cause, or is decoded exactly when its bytes say how; no row is lost
without a word. Every test builds its own hostile file and calls ``sources.py`` directly (no Ray):
``source_items`` is what the driver checks before any Ray work, ``read_rows`` what a read task does.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo.data.sources import SourceError, read_rows, source_items
from raydpo.errors import InputError, input_error

ROWS = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": "no"} for i in range(40)]
ROOT = Path(__file__).resolve().parents[2]


def _jsonl(rows: list[dict] = ROWS) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _csv(rows: list[dict] = ROWS) -> str:
    return "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)


def _read(path: Path | str) -> list[dict]:
    """Every row of one source: the driver's checks, then its read task(s)."""
    return [row for item in source_items([str(path)], "train") for row in read_rows(item)]


def _prompts(path: Path) -> list[str]:
    return [json.loads(row["text"])["prompt"] for row in _read(path)]


def _fails(path: Path | str, *causes: str) -> str:
    """The one-line ``SourceError`` that reading ``path`` raises; it names the path and each cause."""
    with pytest.raises(SourceError) as e:
        _read(path)
    message = str(e.value)
    assert f"data source {path}" in message and "\n" not in message, message
    for cause in causes:
        assert cause in message, message
    return message


# --- encodings -----------------------------------------------------------------------------------

# (codec that writes the byte-order mark, as Python's encoders do for these names)
MARKED = {"UTF-8": "utf-8-sig", "UTF-16 LE": "utf-16-le", "UTF-16 BE": "utf-16-be", "UTF-32 LE": "utf-32-le",
          "UTF-32 BE": "utf-32-be"}
MARKS = {"UTF-8": codecs.BOM_UTF8, "UTF-16 LE": codecs.BOM_UTF16_LE, "UTF-16 BE": codecs.BOM_UTF16_BE,
         "UTF-32 LE": codecs.BOM_UTF32_LE, "UTF-32 BE": codecs.BOM_UTF32_BE}


def _marked(text: str, encoding: str) -> bytes:
    return MARKS[encoding] + text.encode(MARKED[encoding].removesuffix("-sig"))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("encoding", list(MARKS))
def test_a_byte_order_mark_is_decoded_in_every_text_format(tmp_path, encoding, packed):
    """Once the UTF-8 mark lost the first JSONL row, the whole JSON array and every CSV row (a
    ``\\ufeffprompt`` header); UTF-16 JSONL was one unparseable row. Now every row reads, with the
    mark gone from the first one, compressed or not."""
    texts = {"rows.jsonl": _jsonl(), "rows.json": json.dumps(ROWS), "rows.csv": _csv()}
    for name, text in texts.items():
        data = _marked(text, encoding)
        path = tmp_path / (name + (".gz" if packed else ""))
        path.write_bytes(gzip.compress(data) if packed else data)
        assert _prompts(path) == [r["prompt"] for r in ROWS], path
        assert json.loads(_read(path)[0]["text"]) == ROWS[0]  # the CSV header is prompt, not \ufeffprompt


@pytest.mark.parametrize("encoding", ["UTF-16 LE", "UTF-16 BE", "UTF-32 LE", "UTF-32 BE"])
@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.json"])
def test_wide_text_without_a_mark_fails_naming_the_encoding(tmp_path, encoding, name):
    """Without a mark the byte order is a guess: the source fails, naming what it looks like."""
    text = {"rows.jsonl": _jsonl(), "rows.csv": _csv(), "rows.json": json.dumps(ROWS, indent=1)}[name]
    path = tmp_path / name
    path.write_bytes(text.encode(encoding.replace(" ", "-").lower()))
    _fails(path, f"looks like {encoding} text without a byte-order mark", "save it as UTF-8")


def test_bad_bytes_inside_utf8_and_nul_bytes_are_judged_row_by_row(tmp_path):
    """What the reader did before stays: an invalid UTF-8 byte becomes U+FFFD, and a NUL inside a
    row is that row's business (the parser's), not a sign of UTF-16."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n\x00\n'
                     + b'{"prompt": "n\x00ul", "chosen": "a", "rejected": "b"}\n' + _jsonl().encode())
    rows = _read(path)
    assert len(rows) == 3 + len(ROWS)
    assert json.loads(rows[0]["text"])["prompt"] == "caf\ufffd" and rows[1]["text"] == "\x00\n"

    # NUL lines at every second byte after a UTF-8 row: NULs where UTF-16 BE puts them, but the
    # text does not read as rows in UTF-16: still UTF-8, each line judged by the parser.
    path.write_bytes(_jsonl().splitlines(keepends=True)[0].encode() + b"\x00\n" * 40)
    assert len(_read(path)) == 41


# --- compression ---------------------------------------------------------------------------------


def test_gzip_is_told_by_its_magic_bytes_not_its_name(tmp_path):
    """A plain file named .gz was one unparseable row; a gzip named .jsonl, rows of binary junk."""
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(_jsonl())
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(_jsonl().encode()))
    packed_csv = tmp_path / "packed.csv"
    packed_csv.write_bytes(gzip.compress(_csv().encode()))
    for path in (plain, packed, packed_csv):
        assert _prompts(path) == [r["prompt"] for r in ROWS], path


def _complete_lines(cut: bytes) -> int:
    """Complete lines in what a truncated gzip still decompresses to."""
    return zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.996])
def test_truncated_gzip_fails_saying_after_which_line(tmp_path, fraction):
    """Once the rows before the cut were kept and the loss went unsaid (at 0.4%, training went on).
    Many rows, so the cut falls after some complete lines and the first bytes decompress fine."""
    rows = [{"prompt": f"question {i} " + "x" * (i % 97), "chosen": "a", "rejected": "b"} for i in range(3000)]
    full = gzip.compress(_jsonl(rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: int(len(full) * fraction)])
    lines = _complete_lines(path.read_bytes())
    assert 0 < lines < len(rows)
    source_items([str(path)], "train")  # the first bytes are sound: the driver cannot know
    _fails(path, f"the gzip stream is truncated after line {lines}:", "the rest of the file is lost")


def test_truncated_gzip_csv_counts_rows_and_a_cut_before_any_row_says_so(tmp_path):
    full = gzip.compress(_csv(ROWS * 50).encode())
    csv_path = tmp_path / "cut.csv.gz"
    csv_path.write_bytes(full[: len(full) // 2])
    rows = _complete_lines(csv_path.read_bytes()) - 1  # the header is no row
    _fails(csv_path, f"truncated after row {rows}:")
    header_only = tmp_path / "header.jsonl.gz"
    header_only.write_bytes(full[:10])  # the gzip header alone
    _fails(header_only, "the gzip stream is truncated before its first row")


def test_corrupt_gzip_fails_naming_the_damage(tmp_path):
    """A wrong checksum: in a big file a read task finds it after the last line; a small file is
    checked whole by the driver, as is junk after the magic bytes."""
    for name, rows, cause in [("big.jsonl.gz", ROWS * 100, f"the gzip stream is corrupt after line {len(ROWS) * 100} (CRC check failed"),
                              ("small.jsonl.gz", ROWS, "is not a valid gzip stream (Error -3 while decompressing data: incorrect data check)")]:
        data = bytearray(gzip.compress(_jsonl(rows).encode()))
        data[-8] ^= 0xFF  # the CRC-32 in the trailer
        path = tmp_path / name
        path.write_bytes(bytes(data))
        _fails(path, cause)
    junk = tmp_path / "junk.jsonl.gz"
    junk.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(SourceError, match=r"junk\.jsonl\.gz: is not a valid gzip stream \("):
        source_items([str(junk)], "train")


def test_formats_no_reader_knows_are_named(tmp_path):
    """A zip (an .xlsx is one), bzip2, xz, tar or doubly gzipped file was read as UTF-8 junk:
    unparseable rows, or with format detection a source left out."""
    zipped = tmp_path / "rows.jsonl.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("rows.jsonl", _jsonl())
    (tmp_path / "rows.jsonl.bz2").write_bytes(bz2.compress(_jsonl().encode()))
    (tmp_path / "rows.jsonl.xz").write_bytes(lzma.compress(_jsonl().encode()))
    with tarfile.open(tmp_path / "rows.tar.gz", "w:gz") as tar:
        tar.add(zipped, arcname="rows.jsonl.zip")
    (tmp_path / "twice.jsonl.gz").write_bytes(gzip.compress(gzip.compress(_jsonl().encode())))
    _fails(zipped, "is a zip archive")
    _fails(tmp_path / "rows.jsonl.bz2", "is bzip2-compressed")
    _fails(tmp_path / "rows.jsonl.xz", "is xz-compressed")
    _fails(tmp_path / "rows.tar.gz", "is a tar archive")
    _fails(tmp_path / "twice.jsonl.gz", "is compressed twice (a gzip inside a gzip)")


# --- Parquet -------------------------------------------------------------------------------------


def test_damaged_parquet_fails_on_the_driver(tmp_path):
    """Once ``ArrowInvalid: Parquet magic bytes not found`` from a Ray task, naming no file."""
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), good)
    data = good.read_bytes()
    cases = {
        "zero.parquet": (b"", "is empty (0 bytes)"),
        "cut.parquet": (data[: len(data) // 2], "is not a readable Parquet file (Parquet magic bytes not found"),
        "footer.parquet": (data[:-12] + b"\x00" * 8 + b"PAR1", "is not a readable Parquet file ("),
        "other.parquet": (_csv().encode(), "is not a Parquet file (it does not begin with the bytes PAR1)"),
        "packed.parquet.gz": (gzip.compress(data), "is a gzip-compressed Parquet file"),
    }
    for name, (content, cause) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SourceError, match=f"data source {path}: ") as e:
            source_items([str(path)], "train")  # the driver: no read task is planned
        assert cause in str(e.value), (name, str(e.value))
    named_jsonl = tmp_path / "table.jsonl"  # Parquet by its magic bytes, whatever the name
    named_jsonl.write_bytes(data)
    assert _prompts(named_jsonl) == _prompts(good) == [r["prompt"] for r in ROWS]


def test_a_damaged_parquet_page_fails_the_read_naming_the_row(tmp_path):
    """The footer is sound, so the driver passes it; the read task meets the damaged page."""
    path = tmp_path / "rows.parquet"
    rows = [{"prompt": f"question {i} " + "x" * (i % 50), "chosen": f"c{i}", "rejected": "r"} for i in range(5000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)  # snappy pages, checked when read
    column = pq.read_metadata(path).row_group(3).column(0)
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle: middle + 64] = bytes(b ^ 0x5A for b in data[middle: middle + 64])
    path.write_bytes(bytes(data))
    source_items([str(path)], "train")
    message = _fails(path, "reading failed after row ", "the rest was not read")
    assert 0 < int(message.split("after row ")[1].split(" ")[0]) <= 3000  # at most the three sound row groups


# --- JSON arrays ---------------------------------------------------------------------------------


def test_json_array_syntax_error_names_the_place(tmp_path):
    """Once the whole array (19 good elements) was one unparseable row, with no position."""
    path = tmp_path / "rows.json"
    path.write_text("[\n" + "".join(json.dumps(r) + ",\n" for r in ROWS[:19]) + '{"prompt": "x" "chosen": "y"}\n]\n')
    message = _fails(path, "not valid JSON at line 21, column 16 (character ", "Expecting ',' delimiter",
                     "near '")
    assert '"prompt": "x" "chosen"' in message
    lines = tmp_path / "lines.json"  # JSONL under a .json name: Extra data after the first object
    lines.write_text(_jsonl())
    _fails(lines, "not valid JSON at line 2, column 1", "name it .jsonl")


# --- empty sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "cause"), [
    ("empty.jsonl", b"", "is empty (0 bytes)"),
    ("blank.jsonl", b"\n  \n\t\r\n\n", "holds no rows"),
    ("bom-only.jsonl", codecs.BOM_UTF8 + b"\n", "holds no rows"),
    ("header.csv", b"prompt,chosen,rejected\n", "holds no rows"),
    ("empty.json", b"[]", "holds no rows"),
    ("blank.json", b"  \n", "holds no rows"),
    ("empty.jsonl.gz", gzip.compress(b""), "is empty (a gzip of no bytes)"),
    ("blank.jsonl.gz", gzip.compress(b"\n\n"), "holds no rows"),
])
def test_a_source_without_rows_fails_naming_it(tmp_path, name, content, cause):
    """Once it exited 0, and a typo'd shard of blank lines went unnoticed."""
    path = tmp_path / name
    path.write_bytes(content)
    _fails(path, cause)


def test_a_parquet_file_of_no_rows_fails_on_the_driver(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS).slice(0, 0), path)
    with pytest.raises(SourceError, match=r"none\.parquet: holds no rows \(a Parquet file of 0 rows\)"):
        source_items([str(path)], "train")


# --- what is not a readable file ---------------------------------------------------------------


def test_paths_that_are_not_regular_files_fail_before_reading(tmp_path):
    """A FIFO would block the read task forever and a device never end; both fail on the driver,
    without being opened, as do a socket and a broken link."""
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "sock.jsonl"))
        for name, cause in [("fifo.jsonl", "is a FIFO (named pipe), not a regular file"),
                            ("zero.jsonl", "is a character device, not a regular file"),
                            ("sock.jsonl", "is a socket, not a regular file"),
                            ("gone.jsonl", "cannot be read (No such file or directory)")]:
            with pytest.raises(SourceError, match=f"data source {tmp_path / name}: ") as e:
                source_items([str(tmp_path / name)], "train")
            assert cause in str(e.value)
        item = {"kind": "file", "source": str(tmp_path / "fifo.jsonl"), "path": str(tmp_path / "fifo.jsonl"), "split": "train"}
        with pytest.raises(SourceError, match="is a FIFO"):  # a read task checks again, and does not block
            next(read_rows(item))
    finally:
        server.close()


def test_an_io_error_names_the_source(tmp_path):
    """``/proc/self/mem`` is a regular file whose first read fails with EIO: a real I/O error, met on
    the driver and again by a read task planned without it (as for a remote object)."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux's /proc/self/mem to provoke a real I/O error")
    _fails("/proc/self/mem", "cannot be read (", "Input/output error")
    with pytest.raises(SourceError, match=r"/proc/self/mem: cannot be read \(.*Input/output error"):
        next(read_rows({"kind": "file", "source": "/proc/self/mem", "path": "/proc/self/mem", "split": "train"}))


_CHECK = "from raydpo.data.sources import source_items; source_items([{!r}], 'train')"


def test_a_file_that_may_not_be_read_names_the_source(tmp_path):
    """chmod 000. As root the permission bits do not bind, so the check runs in a child process that
    is root without the capabilities that override them (``setpriv``)."""
    path = tmp_path / "secret.jsonl"
    path.write_text(_jsonl())
    path.chmod(0)
    if os.geteuid() != 0:
        _fails(path, "cannot be read (", "Permission denied")
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, where chmod 000 still reads, and setpriv (util-linux) is missing")
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c",
                           _CHECK.format(str(path))], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raydpo.data.sources.SourceError: data source {path}: cannot be read ("), done.stderr
    assert "Permission denied" in last


def test_a_source_error_is_an_input_error_found_under_wrappers(tmp_path):
    """What jobs catch: an ``InputError`` (exit 2, message alone), also when chained by Ray."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(SourceError) as e:
        source_items([str(path)], "train")
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    try:
        raise RuntimeError("a task failed") from e.value
    except RuntimeError as wrapper:
        assert input_error(wrapper) is e.value


# --- a giant line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_a_giant_jsonl_line_is_never_held_whole(tmp_path, packed):
    """A line past the bound comes out cut to one character past it (the tokenize stage then drops
    it as too_long) and the rest of it is read past: reading a 32 MB line holds well under 32 MB,
    and the lines after it keep their numbers."""
    import tracemalloc

    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    giant = json.dumps({"prompt": "p" * (32 << 20), "chosen": "a", "rejected": "b"})
    data = f"{good}\n{giant}\n\n{good}\n".encode()
    path = tmp_path / ("rows.jsonl.gz" if packed else "rows.jsonl")
    path.write_bytes(gzip.compress(data) if packed else data)
    (item,) = source_items([str(path)], "train")
    tracemalloc.start()
    rows = list(read_rows(item, max_chars=1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r["row_id"], len(r["text"])) for r in rows] == [(1, len(good) + 1), (2, 1001), (4, len(good) + 1)]
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB held while reading a 32 MiB line"
    assert [r["row_id"] for r in read_rows(item)] == [1, 2, 4]  # unbounded: the line whole, as before
