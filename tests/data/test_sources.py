"""Sources beyond plain files (save_to_disk folders, load_dataset, file:// URIs) and mixing by weight.

The Hugging Face paths run for real on local folders: ``datasets.load_dataset`` on a folder of
data files is the same call as on a hub name, and nothing here may reach the hub.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

# Set at import, before the session's Ray starts, so its workers inherit them too.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "raydpo-tests-hf-cache"))

from raydpo.config import ConfigError, validate
from raydpo.data import sources
from raydpo.data.pipeline import build_report, kept_rows, mix_sources, tokenized_dataset
from raydpo.data.sources import SourceError, expand_sources, mixture_weights, source_items
from raydpo.data.tokenize import TokenizeSettings

import datasets  # noqa: E402  (after the HF_* variables above, which it reads at import)


def _rows(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{prefix}{i}", "chosen": "yes", "rejected": "no"} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenized(train, eval_=(), fraction=0.0):
    # The tiny tokenizer is built in code by each worker: no model folder needed.
    return tokenized_dataset(list(train), list(eval_), model_path="tiny", gguf_file=None,
                             settings=TokenizeSettings(64, 32), eval_fraction=fraction, seed=0).materialize()


def test_save_to_disk_dataset_and_dataset_dict(ray_local, tmp_path, monkeypatch):
    """A saved Dataset (read in row ranges of 4) and two splits of a saved DatasetDict: every row
    is read once, with its row id, and a malformed row is counted under its folder."""
    monkeypatch.setattr(sources, "ROWS_PER_READ_TASK", 4)  # the driver plans the ranges
    rows = _rows("d", 9) + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows("t", 5)),
                          "test": datasets.Dataset.from_list(_rows("e", 3))}).save_to_disk(str(tmp_path / "dd"))
    train = [str(tmp_path / "ds"), {"path": str(tmp_path / "dd"), "split": "train"}]
    assert len(source_items(train, "train")) == 3 + 2  # 10 rows, then 5, in ranges of 4
    tokenized = _tokenized(train, [{"path": str(tmp_path / "dd"), "split": "test"}])
    report = build_report(tokenized)
    ds_id, train_id, test_id = str(tmp_path / "ds"), str(tmp_path / "dd" / "train"), str(tmp_path / "dd" / "test")
    assert {s: (c["read"], c["kept"]) for s, c in report.sources.items()} == {ds_id: (10, 9), train_id: (5, 5), test_id: (3, 3)}
    assert report.dropped == {"identical": 1} and report.examples["identical"] == [f"{ds_id}:10"]
    assert report.splits == {"train": 14, "eval": 3}
    ids = [r["row_id"] for r in tokenized.select_columns(["source", "row_id"]).take_all() if r["source"] == ds_id]
    assert ids == list(range(1, 11))  # row ids run on across the ranges, in order


def test_saved_folder_errors_name_the_source(tmp_path):
    """A DatasetDict of several splits needs split; a saved Dataset has none; a plain folder is no source."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows("t", 2)),
                          "test": datasets.Dataset.from_list(_rows("e", 2))}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(_rows("d", 2)).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match=r"dd: a saved DatasetDict with splits train, test; choose one"):
        source_items([str(tmp_path / "dd")], "train")
    with pytest.raises(SourceError, match=r"splits train, test; choose one with split: NAME \(not 'valid'\)"):
        source_items([{"path": str(tmp_path / "dd"), "split": "valid"}], "train")
    with pytest.raises(SourceError, match=r"ds: a saved Dataset has no splits"):
        source_items([{"path": str(tmp_path / "ds"), "split": "train"}], "train")
    with pytest.raises(SourceError, match=r"plain' is a folder but not a datasets save_to_disk folder"):
        expand_sources([str(tmp_path / "plain")])
    with pytest.raises(ValueError, match="split is for hf sources and save_to_disk folders only"):
        source_items([{"path": str(_jsonl(tmp_path / "a.jsonl", _rows("a", 1))), "split": "train"}], "train")


def test_hf_load_dataset_on_a_local_folder(ray_local, tmp_path):
    """``{hf: NAME, split}`` goes through ``datasets.load_dataset`` in the read task; a row with a
    missing field (null in the Arrow table) is counted, not lost."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", _rows("t", 6) + [{"prompt": "q", "chosen": "only"}])
    _jsonl(folder / "test.jsonl", _rows("e", 4))
    train = [{"hf": str(folder), "split": "train"}]
    report = build_report(_tokenized(train, [{"hf": str(folder), "split": "test"}]))
    tid, eid = f"hf:{folder}:train", f"hf:{folder}:test"
    assert {s: (c["read"], c["kept"]) for s, c in report.sources.items()} == {tid: (7, 6), eid: (4, 4)}
    assert report.dropped == {"missing_field": 1} and report.examples["missing_field"] == [f"{tid}:7"]
    assert expand_sources([{"hf": "org/name", "subset": "cfg", "split": "test", "revision": "v1"}]) == [
        "hf:org/name/cfg:test@v1"]  # names only: nothing is fetched until a read task runs


def test_saved_and_hf_sources_that_cannot_be_read_name_them(tmp_path):
    """A saved Dataset of no rows (which ``load_from_disk`` fails on with an IndexError) and a damaged
    one, on the driver; an hf split that does not exist, in the read task (no Ray needed to run one).
    One ``SourceError`` each, naming the source."""
    datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(SourceError, match=re.escape(f"data source {tmp_path / 'none'}: cannot be loaded (IndexError")):
        source_items([str(tmp_path / "none")], "train")
    datasets.Dataset.from_list(_rows("d", 3)).save_to_disk(str(tmp_path / "damaged"))
    for shard in (tmp_path / "damaged").glob("*.arrow"):
        shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(SourceError, match=re.escape(f"data source {tmp_path / 'damaged'}: cannot be loaded (")):
        source_items([str(tmp_path / "damaged")], "train")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", _rows("t", 2))
    [item] = source_items([{"hf": str(folder), "split": "validation"}], "train")
    with pytest.raises(SourceError, match=re.escape(f"data source hf:{folder}:validation: cannot be loaded (")
                       + ".*validation"):
        list(sources.read_rows(item))


def test_missing_datasets_package_names_the_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when not installed
    with pytest.raises(ImportError, match=r"data source hf:org/name:train: .*pip install 'raydpo\[hf\]'"):
        source_items([{"hf": "org/name"}], "train")


def test_file_uris_and_uri_globs(ray_local, tmp_path):
    """``file:///abs/path`` reads through pyarrow's filesystem; a glob over a URI is expanded there."""
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 3))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in _rows("b", 2)) + "{broken\n")
    uri_a, uri_b = f"file://{a}", f"file://{tmp_path}/b.jsonl.gz"
    assert expand_sources([f"file://{tmp_path}/*.jsonl*"]) == [uri_a, uri_b]
    report = build_report(_tokenized([uri_a, f"file://{tmp_path}/*.gz"]))
    assert {s: (c["read"], c["kept"]) for s, c in report.sources.items()} == {uri_a: (3, 3), uri_b: (3, 2)}
    assert report.examples["unparseable"] == [f"{uri_b}:3"]
    with pytest.raises(SourceError, match="matches no file"):
        expand_sources([f"file://{tmp_path}/missing.jsonl"])
    with pytest.raises(SourceError, match="matches no file"):
        expand_sources([f"file://{tmp_path}/*.parquet"])


def _mixed(kept, weights, groups, seed):
    mixed, counts = mix_sources(kept, weights, seed, groups)
    rows = mixed.select_columns(["source", "row_id", "split"]).take_all()
    return [(r["source"], r["row_id"], r["split"]) for r in rows], counts


def test_mixing_three_to_one(ray_local, tmp_path):
    """A: 40 kept train rows, B: 8, weights 3:1 -> N = 48 pairs: 36 of A (a sample without
    replacement) and 12 of B (every row once, 4 of them twice). Eval rows pass unchanged; the same
    seed gives the same rows, another seed others."""
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 40) + [{"prompt": "x"}])  # one dropped row: not available
    b = _jsonl(tmp_path / "b.jsonl", _rows("b", 8))
    e = _jsonl(tmp_path / "e.jsonl", _rows("e", 5))
    train = [{"path": str(a), "weight": 3.0}, str(b)]
    weights, groups = mixture_weights(train)
    assert weights == {str(a): 3.0, str(b): 1.0} and groups == {str(a): str(a), str(b): str(b)}
    kept = kept_rows(_tokenized(train, [str(e)])).materialize()
    rows, counts = _mixed(kept, weights, groups, seed=0)
    assert counts == {str(a): {"available": 40, "used": 36, "weight": 0.75},
                      str(b): {"available": 8, "used": 12, "weight": 0.25}}
    train_rows = Counter((s, r) for s, r, split in rows if split == "train")
    per_source = Counter(s for s, _ in train_rows.elements())
    assert per_source == {str(a): 36, str(b): 12}
    assert sorted(n for (s, _), n in train_rows.items() if s == str(a)) == [1] * 36  # no repeats
    assert sorted(n for (s, _), n in train_rows.items() if s == str(b)) == [1] * 4 + [2] * 4  # all, 4 twice
    assert [(s, r) for s, r, split in rows if split == "eval"] == [(str(e), i) for i in range(1, 6)]
    again, _ = _mixed(kept, weights, groups, seed=0)
    assert again == rows
    other, other_counts = _mixed(kept, weights, groups, seed=1)
    assert other_counts == counts and Counter(other) != Counter(rows)


def test_mixing_a_glob_entry_shares_its_weight(ray_local, tmp_path):
    """The files of one glob entry share its weight (keyed by the pattern as written); a source
    without weight counts 1.0; held-out eval rows are not part of the mixture."""
    for name, n in (("p1", 6), ("p2", 4)):
        _jsonl(tmp_path / f"{name}.jsonl", _rows(name, n))
    other = _jsonl(tmp_path / "other.jsonl", _rows("o", 20))
    pattern = str(tmp_path / "p*.jsonl")
    train = [{"path": pattern, "weight": 1.0}, {"path": str(other)}]
    weights, groups = mixture_weights(train)
    assert weights == {pattern: 1.0, str(other): 1.0}
    assert groups == {str(tmp_path / "p1.jsonl"): pattern, str(tmp_path / "p2.jsonl"): pattern, str(other): str(other)}
    kept = kept_rows(_tokenized(train, fraction=0.2)).materialize()
    report_splits = Counter(r["split"] for r in kept.select_columns(["split"]).take_all())
    rows, counts = _mixed(kept, weights, groups, seed=3)
    n = report_splits["train"]
    assert counts[pattern]["used"] + counts[str(other)]["used"] == n
    assert abs(counts[pattern]["used"] - counts[str(other)]["used"]) <= 1  # 1:1
    assert Counter(split for _, _, split in rows) == {"train": n, "eval": report_splits["eval"]}
    mixed_by_entry = Counter(groups[s] for s, _, split in rows if split == "train")
    assert mixed_by_entry == {k: c["used"] for k, c in counts.items()}


def test_mixture_weights_rules(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 1))
    assert mixture_weights([str(a), {"path": str(tmp_path / "*.jsonl")}]) is None  # no weight: no mixture
    with pytest.raises(ValueError, match=r"data.train.1: source .*a.jsonl' is also in data.train.0"):
        mixture_weights([str(a), {"path": str(tmp_path / "*.jsonl"), "weight": 2}])


def _config(train, eval_=()):
    return validate({"model": {"name_or_path": "tiny"}, "data": {"train": train, "eval": list(eval_)}})


@pytest.mark.parametrize(
    ("train", "eval_", "message"),
    [
        ([{"path": "a.jsonl", "weight": 0}], [], "data.train.0.weight: Input should be greater than 0"),
        (["a.jsonl", {"path": "a", "hf": "b"}], [], "data.train.1: Value error, give exactly one of path or hf"),
        ([{"split": "train"}], [], "data.train.0: Value error, give exactly one of path or hf"),
        ([{"path": "a", "subset": "x"}], [], "data.train.0: Value error, subset is for hf sources only"),
        ([{"hf": "a", "name": "x"}], [], "data.train.0.name: Extra inputs are not permitted"),
        (["a.jsonl"], ["b.jsonl", {"path": "c", "weight": 2}], "data.eval.1.weight: weights mix training sources only"),
    ],
)
def test_source_config_errors_name_the_key(train, eval_, message):
    with pytest.raises(ConfigError) as e:
        _config(train, eval_)
    assert message in str(e.value)


def test_source_config_keeps_strings_and_dumps_what_was_set():
    cfg = _config(["a.jsonl", {"hf": "org/name", "split": "test", "weight": 2}])
    assert cfg.data.train[0] == "a.jsonl"
    assert cfg.data.train[1].hf == "org/name" and cfg.data.train[1].weight == 2.0
    assert cfg.model_dump(mode="json")["data"]["train"] == ["a.jsonl", {"hf": "org/name", "split": "test", "weight": 2.0}]
