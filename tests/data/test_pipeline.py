"""The Ray Data pipeline on real files: every row is accounted for, gzip included."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydpo.data.pipeline import (
    OOM_RETRIES_ENV,
    TASK_RETRIES,
    TOKENIZE_STAGE,
    DataWorkerLost,
    bound_oom_retries,
    build_report,
    kept_rows,
    stage_retries,
    tokenized_dataset,
)
from raydpo.data.tokenize import TokenizeSettings
from raydpo.models import write_tiny
from tests.conftest import SHARED

HH = SHARED / "data/hh-rlhf/helpful-base/test.jsonl.gz"


def _tokenized(model_dir, train, eval_=(), fraction=0.0, limit=None, fmt="auto"):
    return tokenized_dataset(list(map(str, train)), list(map(str, eval_)), model_path=str(model_dir), gguf_file=None,
                             settings=TokenizeSettings(64, 32), eval_fraction=fraction, seed=0, limit=limit, fmt=fmt)


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


def test_rows_past_the_size_bound_are_too_long(ray_local, tmp_path):
    """Rows whose JSON text is over ``max_row_bytes`` (1 MiB here) are dropped as too_long before
    parsing, in the workers and in shape detection (the giant row is the source's first); a long
    prompt under the bound is kept, cut to its tail (keep_end)."""
    model_dir = write_tiny(tmp_path / "m")
    bound = TokenizeSettings(64, 32).max_row_bytes
    giant = json.dumps({"prompt": "q", "chosen": "x" * (3 * bound), "rejected": "y"})  # one field of 3 MiB
    over_in_bytes = json.dumps({"prompt": "é" * (bound // 2), "chosen": "a", "rejected": "b"}, ensure_ascii=False)
    assert len(over_in_bytes) < bound < len(over_in_bytes.encode())  # under in characters, over in bytes
    long_prompt = json.dumps({"prompt": "p" * 20_000 + " end?", "chosen": "yes", "rejected": "no"})
    good = [json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join([giant, *good, over_in_bytes, long_prompt]) + "\n")
    ds = _tokenized(model_dir, [tmp_path / "a.jsonl"])
    report = build_report(ds)
    assert (report.read, report.kept, report.dropped) == (8, 6, {"too_long": 2})
    assert report.examples["too_long"] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:7"]
    kept = kept_rows(ds).take_all()
    assert [r["truncated"] for r in kept] == [False] * 5 + [True]
    assert len(kept[-1]["prompt_ids"]) == 32  # the prompt's last 32 tokens


def test_a_worker_lost_on_every_try_fails_the_run(ray_local, tmp_path, monkeypatch):
    """The tokenize stage's worker is killed (SIGKILL, as the kernel's OOM killer does) on each try:
    the run fails after ``TASK_RETRIES`` retries with ``DataWorkerLost`` naming the stage, instead of
    Ray Data's default of retrying for ever. The stage is raydpo's own (``tokenized_dataset``); only
    the driver's OOM-retry bound is set here, as a job sets it before ``ray.init`` (``bound_oom_retries``)."""
    import threading
    import time

    import psutil

    monkeypatch.setenv(OOM_RETRIES_ENV, str(TASK_RETRIES))
    assert stage_retries() == TASK_RETRIES
    # 20 rows of 100 kB: about 15 s of tokenizing per try, so each try is seen running and killed.
    rows = [json.dumps({"prompt": "p" * 100_000, "chosen": f"yes {i}", "rejected": "no"}) for i in range(20)]
    (tmp_path / "slow.jsonl").write_text("\n".join(rows) + "\n")
    killed: list[int] = []  # pids
    stop = threading.Event()

    def kill_tokenize_workers() -> None:
        """Kill each worker process of ours (a descendant of this test) that runs tokenize_batch; at
        most two more times than the stage may retry, so a stage retried for ever then succeeds."""
        me = psutil.Process()
        while not stop.is_set() and len(killed) < TASK_RETRIES + 3:
            for proc in me.children(recursive=True):
                try:
                    running = "tokenize_batch" in " ".join(proc.cmdline())
                    if running and proc.pid not in killed:
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.Error:  # gone meanwhile
                    continue
            time.sleep(0.05)

    killer = threading.Thread(target=kill_tokenize_workers, daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(DataWorkerLost) as error:
            tokenized_dataset([str(tmp_path / "slow.jsonl")], [], model_path="tiny", gguf_file=None,
                              settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0)
    finally:
        stop.set()
        killer.join()
    message = str(error.value)
    assert message.startswith(f"{TOKENIZE_STAGE}: a Ray worker died (out of memory, or a crash) on each of "
                              f"{TASK_RETRIES + 1} tries of the same task ({TASK_RETRIES} retries), so the run stops. "
                              "Rows over 1,048,576 bytes are dropped as too_long"), message
    assert "Give each worker more memory" in message and "lower data.max_length" in message
    assert len(killed) == TASK_RETRIES + 1, killed
    assert time.monotonic() - started < 120


def test_bound_oom_retries_reaches_ray_core(tmp_path):
    """``bound_oom_retries`` before ``ray.init`` (after importing Ray, as a job does) bounds Ray core's
    retries of a task killed for memory: its task manager says so in the driver's debug log (by
    default it says ``-1 oom retries``, i.e. for ever). A fresh driver, in its own process."""
    script = f"""
import glob, ray, ray.data
from raydpo.data.pipeline import bound_oom_retries, stage_retries
assert bound_oom_retries() and stage_retries() == {TASK_RETRIES}
ray.init(address="local", num_cpus=1, include_dashboard=False)
task = ray.remote(max_retries=stage_retries())(lambda: 1)
assert ray.get(task.remote()) == 1
logs = ray._private.worker._global_node.get_session_dir_path() + "/logs/python-core-driver-*.log"
ray.shutdown()
print([line.split("with ", 1)[1].strip() for p in glob.glob(logs) for line in open(p) if "oom retries" in line])
"""
    env = {k: v for k, v in os.environ.items() if k != OOM_RETRIES_ENV} | {"RAY_BACKEND_LOG_LEVEL": "debug"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"['{TASK_RETRIES} retries, {TASK_RETRIES} oom retries']"


def test_without_an_oom_bound_the_stages_do_not_retry(ray_local, monkeypatch):
    """Ray already started without the bound (as the test session's Ray): it cannot be bounded now,
    so the stages run with max_retries 0, where Ray core gives 0 OOM retries too."""
    monkeypatch.delenv(OOM_RETRIES_ENV, raising=False)
    assert bound_oom_retries() is False and OOM_RETRIES_ENV not in os.environ
    assert stage_retries() == 0
    for value, retries in (("-1", 0), ("x", 0), ("0", TASK_RETRIES), ("5", TASK_RETRIES)):
        monkeypatch.setenv(OOM_RETRIES_ENV, value)
        assert stage_retries() == retries
