"""Hypothesis-generated input FILES through the real pipeline (issues 3 and 12): malformed lines,
invalid UTF-8 (surrogates written as bytes among it), lone surrogates as JSON escapes, nesting past
the parser's stack, NUL bytes, empty and blank files, JSON junk beside valid rows, huge strings, a
truncated .gz, a CSV with ragged rows, and chat templates that raise on some rows. Whatever the
bytes, nothing crashes and every record is accounted for: ``read`` is the number of records each
file holds and ``kept + sum(dropped) == read``; a whole source that cannot be read (empty, cut
short) fails with a ``SourceError`` naming it. One file per example holds 150 seeded hostile rows
(``checks.hostile_rows``), whose reasons must equal, row by row, those of ``tokenize_batch`` run
in-process (12 x 150 rows through Ray).

Each example runs ONE Ray pipeline over several files (a pipeline run costs about a second), so
few examples cover many files. ``fmt="standard"`` makes junk count row by row; with ``auto`` a
source whose rows fit no known shape fails as a whole, with a clear error (the last test).
"""
from __future__ import annotations

import gzip
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyarrow as pa

from raydpo.data.pipeline import DataError, build_report, tokenize_batch, tokenized_dataset
from raydpo.data.sources import SourceError, read_rows, source_items
from raydpo.data.tokenize import TokenizeSettings
from tests.data.checks import TEMPLATES, hostile_rows, hostile_text

# --- one line of a JSONL file: bytes without b"\n" or b"\r" (both end a line when reading) ---------
_text = st.one_of(st.text(max_size=20), hostile_text())  # lone surrogates, NUL, odd and huge strings
_json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_PARTS = ("prompt", "chosen", "rejected")
# Markers on which the py_errors template fails (see checks.PY_ERRORS_TEMPLATE).
_valid = st.fixed_dictionaries({k: st.one_of(st.text(max_size=30), _text, st.sampled_from(["q #div", "a #add", "q #undef"]))
                                for k in _PARTS})
_wrong_types = st.fixed_dictionaries({k: _json_junk for k in _PARTS})
_missing_keys = st.dictionaries(st.sampled_from(_PARTS), st.text(max_size=10), max_size=2)
_huge = st.sampled_from([10_000, 100_000]).map(lambda n: {"prompt": "p" * n, "chosen": "c" * n, "rejected": "r"})
_deep = st.sampled_from([b"[" * 20_000, b"[" * 5_000 + b"]" * 5_000, b'{"prompt": "q", "chosen": ' + b"[" * 5_000, b'{"a":' * 20_000])
_line = st.one_of(
    # ensure_ascii=False writes a lone surrogate as its (invalid UTF-8) bytes; True as a JSON escape.
    st.one_of(_valid, _wrong_types, _missing_keys, _huge, _json_junk).flatmap(
        lambda row: st.booleans().map(lambda ascii_: json.dumps(row, ensure_ascii=ascii_).encode("utf-8", "surrogatepass"))),
    st.binary(max_size=40),  # invalid UTF-8, control bytes, half a JSON object ...
    st.text(max_size=40).map(lambda s: s.encode()),
    hostile_text().map(lambda s: s.encode("utf-8", "surrogatepass")),
    _deep,
    st.sampled_from([b"", b"   ", b"\t", b'{"prompt": "cut', b"\xff\xfe\xfd", b"\x00", b'{"prompt": "\x00"}']),
).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
HOSTILE_ROWS = 150  # seeded hostile rows per example, in their own file (f.jsonl)
_lines = st.lists(_line, max_size=25).map(lambda ls: b"\n".join(ls) + b"\n" if ls else b"")
# The first line of every drawn JSONL file: a valid row, so that the file's first bytes (which say
# how a source is read: gzip, Parquet and other magic bytes, a byte-order mark, UTF-16 without one)
# are a row's, and the drawn junk after it is judged row by row. Sources that fail as a whole
# (empty, truncated) are drawn as such, below; tests/data/test_damaged_sources.py has the rest.
FIRST = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode() + b"\n"
# A CSV cell: no quotes, separators or line breaks, so one line is one record.
_cell = st.text(st.characters(blacklist_characters='",\n\r', blacklist_categories=("Cs",)), max_size=12)
_csv = st.lists(st.lists(_cell, min_size=1, max_size=5), max_size=12).map(
    lambda rows: ("prompt,chosen,rejected\n" + "".join(",".join(r) + "\n" for r in rows)).encode())


def _records_in(data: bytes) -> int:
    """Non-blank lines of a JSONL file (invalid UTF-8 read as U+FFFD, as the reader does)."""
    return sum(1 for line in data.split(b"\n") if line.decode("utf-8", "replace").strip())


def _csv_records(data: bytes) -> int:
    lines = data.decode().split("\n")[1:]  # after the header; an empty line is no record
    return sum(1 for line in lines if line)


Expected = int | str  # the records a file holds, or a fragment of the SourceError it fails with


def _files(draw_lines: bytes, draw_gz: bytes, cut: float, draw_csv: bytes, blank: bytes, seed: int,
           folder: Path) -> dict[str, Expected]:
    """Write one example's files into ``folder``; return path -> the number of records it holds,
    or what its ``SourceError`` says (a whole source that cannot be read fails, naming it)."""
    expected: dict[str, Expected] = {}
    hostile = folder / "f.jsonl"
    hostile.write_text("".join(text + "\n" for text, _ in hostile_rows(seed, HOSTILE_ROWS)), encoding="utf-8")
    expected[str(hostile)] = HOSTILE_ROWS
    plain = folder / "a.jsonl"
    plain.write_bytes(FIRST + draw_lines)
    expected[str(plain)] = 1 + _records_in(draw_lines)
    packed = folder / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(FIRST + draw_gz))
    expected[str(packed)] = 1 + _records_in(draw_gz)
    full = gzip.compress(FIRST + draw_lines + draw_gz)
    truncated = folder / "c.jsonl.gz"
    truncated.write_bytes(full[: int(len(full) * cut)])
    kept = int(len(full) * cut)
    expected[str(truncated)] = (1 + _records_in(draw_lines + draw_gz) if kept == len(full)
                                else "is empty" if kept == 0
                                else "holds no rows" if kept == 1  # b"\x1f": not gzip's magic yet, one blank character
                                else "(truncated|corrupt|not a valid gzip)")  # the rows after the cut are unknown
    table = folder / "d.csv"
    table.write_bytes(draw_csv)
    expected[str(table)] = _csv_records(draw_csv) or "holds no rows"
    empty = folder / "e.jsonl"
    empty.write_bytes(blank)
    expected[str(empty)] = "is empty" if not blank else "holds no rows"
    return expected


_example = {
    "draw_lines": _lines,
    "draw_gz": _lines,
    "cut": st.floats(0.0, 1.0),
    "draw_csv": _csv,
    "blank": st.sampled_from([b"", b"\n", b"\n\n   \n\t\n", b" "]),
    "seed": st.integers(0, 2**32 - 1),
    "template": st.sampled_from(sorted(TEMPLATES)),
}
SETTINGS = TokenizeSettings(64, 32)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(**_example)
def test_expected_counts_match_the_reader(draw_lines, draw_gz, cut, draw_csv, blank, seed, template):
    """The test's own record counts agree with ``read_rows`` file by file (no Ray: fast, many
    examples), so a mismatch in the pipeline test below is the pipeline's."""
    with tempfile.TemporaryDirectory() as tmp:
        for path, want in _files(draw_lines, draw_gz, cut, draw_csv, blank, seed, Path(tmp)).items():
            if isinstance(want, int):
                assert sum(1 for _ in read_rows(source_items([path], "train")[0])) == want, path
            else:
                with pytest.raises(SourceError, match=rf"data source {re.escape(path)}: .*{want}"):
                    sum(1 for _ in read_rows(source_items([path], "train")[0]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(**_example)
def test_malformed_files_are_counted_not_crashed(ray_local, draw_lines, draw_gz, cut, draw_csv, blank, seed, template):
    with tempfile.TemporaryDirectory() as tmp:
        expected = {path: n for path, n in _files(draw_lines, draw_gz, cut, draw_csv, blank, seed, Path(tmp)).items()
                    if isinstance(n, int)}  # whole sources that fail: the test above
        tokenized = tokenized_dataset(list(expected), [], model_path="tiny", gguf_file=None, settings=SETTINGS,
                                      eval_fraction=0.0, seed=0, fmt="standard",
                                      chat_template=TEMPLATES[template]).materialize()
        report = build_report(tokenized)
        hostile = str(Path(tmp) / "f.jsonl")
        got = sorted((r["row_id"], r["drop_reason"]) for r in tokenized.select_columns(
            ["source", "row_id", "pair_index", "drop_reason"]).iter_rows() if r["source"] == hostile and r["pair_index"] == 0)
    assert report.read == sum(expected.values())
    assert report.kept + sum(report.dropped.values()) == report.read
    for path, n in expected.items():
        counts = report.sources.get(path, {"read": 0, "kept": 0, "dropped": {}})
        assert counts["read"] == n, path
        assert counts["kept"] + sum(counts["dropped"].values()) == n, path
    # The hostile rows get, row by row, the reasons the pipeline's function gives them in-process.
    texts = [text for text, _ in hostile_rows(seed, HOSTILE_ROWS)]
    batch = pa.table({"source": ["s"] * len(texts), "row_id": list(range(1, len(texts) + 1)),
                      "split": ["train"] * len(texts), "text": texts})
    oracle = tokenize_batch(batch, model_path="tiny", gguf_file=None, settings=SETTINGS, eval_fraction=0.0, seed=0,
                            fmt="standard", chat_template=TEMPLATES[template])
    assert got == [(r["row_id"], r["drop_reason"]) for r in oracle.to_pylist() if r["pair_index"] == 0]


def test_an_all_junk_source_under_auto_fails_naming_it(ray_local, tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b'{"question": "q", "answer": "a"}\n[1, 2]\n\xff\xfe\n"text"\n')
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"junk\.jsonl.*no known row shape.*answer, question"):
        tokenized_dataset([str(good), str(junk)], [], model_path="tiny", gguf_file=None,
                          settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0, fmt="auto")
