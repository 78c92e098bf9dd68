"""The Ray Data pipeline on real files: every row is accounted for, gzip included."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from raydpo.data.pipeline import build_report, kept_rows, tokenized_dataset
from raydpo.data.tokenize import TokenizeSettings
from raydpo.models import write_tiny
from tests.conftest import SHARED

HH = SHARED / "data/hh-rlhf/helpful-base/test.jsonl.gz"


def _tokenized(model_dir, train, eval_=(), fraction=0.0, limit=None, fmt="auto"):
    return tokenized_dataset(list(map(str, train)), list(map(str, eval_)), model_path=str(model_dir), gguf_file=None,
                             settings=TokenizeSettings(64, 32), eval_fraction=fraction, seed=0, limit=limit, fmt=fmt).materialize()


def test_every_row_is_accounted_for(ray_local, tmp_path):
    """A gzip shard and a plain shard with good, bad and over-long lines: kept + dropped == read, per source."""
    model_dir = write_tiny(tmp_path / "m")
    good = [json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(10)]
    bad = ["{broken", json.dumps({"prompt": "q", "chosen": "a"}), json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}),
           json.dumps({"prompt": "q", "chosen": "x" * 200, "rejected": "y"})]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(good[:5] + bad[:2]) + "\n\n")  # a blank line is no row
    (tmp_path / "b.jsonl").write_text("\n".join(good[5:] + bad[2:]) + "\n")
    report = build_report(_tokenized(model_dir, [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl"], fraction=0.3))
    assert report.read == 14
    assert report.kept == 11  # the over-long chosen is cut to the budget, not dropped
    assert report.truncated == 1
    assert report.dropped == {"unparseable": 1, "missing_field": 1, "identical": 1}
    assert report.kept + sum(report.dropped.values()) == report.read
    assert sum(report.splits.values()) == report.kept and report.splits.get("eval", 0) > 0
    assert report.examples["unparseable"] == [f"{tmp_path / 'a.jsonl.gz'}:6"]
    for s in report.sources.values():
        assert s["kept"] + sum(s["dropped"].values()) == s["read"]


def test_eval_sources_and_limit(ray_local, tmp_path):
    model_dir = write_tiny(tmp_path / "m")
    rows = "".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(30))
    (tmp_path / "t.jsonl").write_text(rows)
    (tmp_path / "e.jsonl").write_text(rows)
    ds = _tokenized(model_dir, [tmp_path / "t.jsonl"], [tmp_path / "e.jsonl"], fraction=0.5, limit=12)
    report = build_report(ds)
    assert report.splits == {"train": 12, "eval": 12}  # eval_fraction ignored when eval sources are given
    assert kept_rows(ds, "eval").count() == 12


@pytest.mark.skipif(not HH.exists(), reason="../shared/data is absent")
def test_real_hh_file(ray_local, tmp_path):
    """The real HH helpful-base test split (2,354 rows), tokenized with the tiny char tokenizer.
    The recorded counts are what this data holds: a few identical pairs, none unaccounted for."""
    model_dir = write_tiny(tmp_path / "m", max_positions=4096)
    ds = tokenized_dataset([str(HH)], [], model_path=str(model_dir), gguf_file=None,
                           settings=TokenizeSettings(4096, 3072), eval_fraction=0.0, seed=0).materialize()
    report = build_report(ds)
    assert report.read == 2354
    assert report.kept + sum(report.dropped.values()) == report.read
    print(json.dumps(report.to_dict()["dropped"]))
    assert report.dropped.get("identical", 0) > 0
    assert report.kept > 2200


def test_parquet_csv_and_json_array_sources(ray_local, tmp_path):
    """The same rows as Parquet, CSV (.csv.gz too) and a JSON array give the same pairs; a CSV
    row with an extra cell is counted as unparseable, and a JSON file holding one object is one row."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = write_tiny(tmp_path / "m")
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": "no"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=4)
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
        f.write("q,a,b,EXTRA\n")
    with gzip.open(tmp_path / "c.csv.gz", "wt", newline="") as f:
        f.write((tmp_path / "b.csv").read_text())
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "e.json").write_text('{"not": "an array"}')
    paths = [tmp_path / n for n in ("a.parquet", "b.csv", "c.csv.gz", "d.json", "e.json")]
    ds = _tokenized(model_dir, paths, fmt="standard")  # fixed: e.json alone would fail shape detection
    report = build_report(ds)
    assert report.read == 6 + 7 + 7 + 6 + 1
    assert report.kept == 24
    assert report.dropped == {"unparseable": 2, "missing_field": 1}  # e.json: one object, one row
    assert report.examples["unparseable"][0] == f"{tmp_path / 'b.csv'}:7"
    by_source = {Path(s).name: c["kept"] for s, c in report.sources.items()}
    assert by_source == {"a.parquet": 6, "b.csv": 6, "c.csv.gz": 6, "d.json": 6, "e.json": 0}
    chosen = {}
    for r in kept_rows(ds).take_all():
        chosen.setdefault(Path(r["source"]).name, []).append(list(r["chosen_ids"]))
    assert chosen["a.parquet"] == chosen["b.csv"] == chosen["c.csv.gz"] == chosen["d.json"]
