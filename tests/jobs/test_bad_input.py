"""Hostile input to the jobs (issue 26): a user's error ends every job the same way, wherever it
was found (reading the config, checking the folders, on the driver, inside a Ray task): exit 2 and
``raydpo: <message>`` on stderr, naming the file, key or row, with no traceback.

The config and folder cases call the ``raydpo`` command's ``main`` in this process and fail before
Ray starts (it is asserted not started); a few run the real command in a process of its own; two
runs of ``raydpo train`` cover the errors found after Ray started (the data report, a read task)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def raydpo(*args: object, timeout: float = 600) -> tuple[int, str]:
    """The real ``raydpo`` command in a process of its own: its exit code and stderr."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, timeout=timeout,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    return proc.returncode, proc.stderr


def raydpo_here(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """The ``raydpo`` command's ``main`` in this process (for errors found before Ray starts: no
    interpreter start-up and imports per case): its exit code and stderr. Asserts it did not start
    or join Ray (``stages.start_ray`` says so on stdout; a test session's own Ray may be up)."""
    from jobs.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "[raydpo] Ray:" not in out, "the error came after Ray started"
    return code, err


def fails_with(code: int, err: str, *parts: str, alone: bool = True) -> str:
    """Asserts the user's-error ending: exit 2, no traceback, and stderr ends with one message,
    ``raydpo: ...`` (lines of its own may follow), holding every part. ``alone``: the message is
    all of stderr (a failure before Ray starts; after, Ray's own warnings may come first).
    Returns the message."""
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("raydpo: ")]
    assert len(starts) == 1 and (starts[0] == 0 or not alone), err[-3000:]
    message = "\n".join(lines[starts[0]:])
    for part in parts:
        assert part in message, f"{part!r} not in:\n{message}"
    return message


def quick_args(tmp_path: Path, *overrides: str) -> list[str]:
    """``--set`` arguments that keep a run inside tmp_path."""
    sets = [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"reference.cache_dir={tmp_path / 'cache'}", *overrides]
    return [arg for s in sets for arg in ("--set", s)]


# --- the config file ------------------------------------------------------------------------------


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


BASE = b"model: {name_or_path: tiny}\ndata: {synthetic: {rows: 10}}\n"


@pytest.mark.parametrize(("make", "parts"), [
    (lambda d: d / "missing.yaml", ["missing.yaml", "No such file"]),
    (lambda d: (d / "folder.yaml").mkdir() or d / "folder.yaml", ["folder.yaml", "is a folder"]),
    (lambda d: os.mkfifo(d / "pipe.yaml") or d / "pipe.yaml", ["pipe.yaml", "not a regular file"]),
    (lambda d: _write(d / "c.yaml", BASE + b"loss: {type: sigm\xf6id}\n"),
     ["c.yaml, line 3, column 18: byte 0xf6 (offset 75) is not UTF-8"]),
    (lambda d: _write(d / "c.yaml", b"model: {name_or_path: tiny\ndata: [\n"),
     ["c.yaml, line 2, column 5: not valid YAML"]),
    (lambda d: _write(d / "c.yaml", BASE + b"train:\n\tlr: 1\n"), ["c.yaml, line 4, column 1", "not tabs"]),
    (lambda d: _write(d / "c.yaml", BASE + b"train:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 1.0e-4\n"),
     ["c.yaml: key train.lr is given twice (line 4, column 3 and line 6, column 3)"]),
    (lambda d: _write(d / "c.yaml", b"- model\n- data\n"), ["c.yaml: the top level must be a mapping", "list"]),
    (lambda d: _write(d / "c.yaml", b""), ["c.yaml: invalid config", "model: Field required"]),
    (lambda d: _write(d / "c.yaml", BASE + b"loss: {type: sigmod}\n"), ["loss.type", "unknown loss 'sigmod'"]),
    (lambda d: _write(d / "c.yaml", BASE + b"loss: {weights: {sigmoid: 1, nope: 1}}\n"), ["loss.weights", "'nope'"]),
    (lambda d: _write(d / "c.yaml", BASE + b"output_dir: s3://bucket/run\n"), ["output_dir", "local folder"]),
    (lambda d: _write(d / "c.yaml", BASE + b"loss: {beta: .inf}\n"), ["loss.beta: Input should be a finite number"]),
    (lambda d: _write(d / "c.yaml", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"), ["c.yaml: not valid YAML: nested too deeply"]),
], ids=["missing", "folder", "fifo", "not-utf8", "bad-yaml", "tab", "duplicate-key", "list", "empty",
        "unknown-loss", "unknown-loss-weight", "output-dir-uri", "infinite", "deep"])
def test_a_bad_config_file_fails_naming_the_file_or_key(tmp_path, capsys, make, parts):
    path = make(tmp_path)
    fails_with(*raydpo_here(capsys, "train", path), *parts)


def test_every_command_reads_its_config_the_same_way(tmp_path):
    """``precompute`` and ``iterate`` too, each the real command in a process of its own."""
    path = _write(tmp_path / "c.yaml", BASE + b"train:\n  lr: 1.0e-3\n  lr: 1.0e-4\n")
    for command in ("precompute", "iterate"):
        fails_with(*raydpo(command, path, timeout=120), "c.yaml: key train.lr is given twice")


def test_a_set_on_an_unknown_key_fails_naming_it(capsys):
    fails_with(*raydpo_here(capsys, "train", QUICKSTART, "--set", "train.lrr=1"),
               "quickstart.yaml: invalid config", "train.lrr")


def test_a_set_below_an_empty_section_sets_it(tmp_path):
    """``online:`` written empty is a section a ``--set`` can fill, not "not a section"."""
    from raydpo.config import load_config

    path = _write(tmp_path / "c.yaml", BASE + b"online:\n")
    cfg = load_config(path, ["online.synthetic.rows=5"])
    assert cfg.online is not None and cfg.online.synthetic.rows == 5


def test_yaml_merge_keys_are_no_duplicates(tmp_path):
    """``<<: *anchor`` then a key of the anchor's mapping overrides it, as YAML means: no error."""
    from raydpo.config import load_config

    path = _write(tmp_path / "c.yaml", b"model:\n  name_or_path: tiny\n  tiny:\n    <<: {hidden_size: 32, num_layers: 1}\n"
                                       b"    hidden_size: 16\ndata: {synthetic: {rows: 10}}\n")
    assert load_config(path).model.tiny.hidden_size == 16


# --- the folders a run writes: checked before any work --------------------------------------------


def _unwritable_place() -> Path:
    """A folder no user (root included) can make: /sys refuses new entries. Skips where it does not."""
    place = Path("/sys/raydpo-test-folder")
    try:
        place.mkdir()
    except OSError:
        return place
    place.rmdir()
    pytest.skip("/sys accepts new folders here")


@pytest.mark.parametrize(("key", "make", "parts"), [
    ("output_dir", lambda d: _write(d / "afile", b"x"), ["output_dir: {p}: is a file, not a folder"]),
    ("output_dir", lambda d: _write(d / "afile", b"x") / "run", ["output_dir: {p}: {d}/afile on its path is a file"]),
    ("output_dir", lambda d: _unwritable_place() / "run", ["output_dir: {p} cannot be made", "Operation not permitted"]),
    ("reference.cache_dir", lambda d: _write(d / "afile", b"x") / "cache", ["reference.cache_dir: {p}: {d}/afile"]),
    ("train.storage_path", lambda d: _write(d / "afile", b"x") / "ckpt", ["train.storage_path: {p}: {d}/afile"]),
    ("tracking.uri", lambda d: _unwritable_place() / "mlruns", ["tracking.uri: {p} cannot be made"]),
], ids=["output-is-a-file", "output-under-a-file", "output-unmakeable", "cache-under-a-file", "storage-under-a-file",
        "store-unmakeable"])
def test_a_folder_the_run_cannot_write_fails_before_ray_naming_its_key(tmp_path, capsys, key, make, parts):
    path = make(tmp_path)
    value = f"sqlite:///{path}/mlflow.db" if key == "tracking.uri" else path  # a SQLite store: its folder is checked
    fails_with(*raydpo_here(capsys, "train", QUICKSTART, *quick_args(tmp_path, f"{key}={value}")),
               *(p.format(p=path, d=tmp_path) for p in parts))


def test_precompute_checks_its_folders_before_ray(tmp_path):
    """Its cache is always written (a reference-free loss too), and its output folder."""
    blocker = _write(tmp_path / "afile", b"x")
    code, err = raydpo("precompute", QUICKSTART, *quick_args(tmp_path, f"reference.cache_dir={blocker / 'cache'}",
                                                             f"output_dir={_unwritable_place() / 'run'}",
                                                             "loss.reference_free=true"), timeout=120)
    message = fails_with(code, err, f"reference.cache_dir: {blocker / 'cache'}: {blocker} on its path is a file",
                         "output_dir: /sys/raydpo-test-folder/run cannot be made")
    assert "Ray:" not in message


@pytest.mark.parametrize(("make", "part"), [
    (lambda d: d / "no-model", "model.name_or_path: {p} does not exist"),
    (lambda d: _write(d / "weights.safetensors", b"x"), "model.name_or_path: {p} is a file"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "model.name_or_path: {p} has no config.json"),
], ids=["missing", "file", "not-a-model-folder"])
def test_a_model_path_that_is_no_model_folder_fails_before_ray(tmp_path, capsys, make, part):
    path = make(tmp_path)
    fails_with(*raydpo_here(capsys, "train", QUICKSTART, *quick_args(tmp_path, f"model.name_or_path={path}")),
               part.format(p=path))


def test_a_source_that_names_nothing_readable_fails_before_ray(tmp_path, capsys):
    """The driver's checks of the sources (``raydpo.data.sources``) run before Ray starts: a
    pattern matching no file, and a weighted source named by two entries."""
    fails_with(*raydpo_here(capsys, "train", QUICKSTART, *quick_args(
        tmp_path, f"data.train=['{tmp_path}/none-*.jsonl']", "data.synthetic=null")),
        f"data source '{tmp_path}/none-*.jsonl' matches no file")
    src = _write(tmp_path / "rows.jsonl", (_good(0) + "\n").encode())
    fails_with(*raydpo_here(capsys, "train", QUICKSTART, *quick_args(
        tmp_path, f"data.train=[{{path: '{src}', weight: 1}}, {{path: '{tmp_path}/*.jsonl', weight: 2}}]",
        "data.synthetic=null")), "data.train.1: source", "is also in data.train.0")


def test_a_read_only_output_dir_fails_naming_it(tmp_path, capsys):
    """A folder without write permission (as any user but root sees it)."""
    if os.geteuid() == 0:
        pytest.skip("root writes a read-only folder: the unmakeable cases above stand for it")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fails_with(*raydpo_here(capsys, "train", QUICKSTART, *quick_args(tmp_path, f"output_dir={locked}")),
                   f"output_dir: {locked} cannot be written")
    finally:
        locked.chmod(0o755)


def test_an_output_dir_whose_parents_are_missing_is_made(tmp_path):
    """Not an error: the check makes the folder (and its parents) and leaves it."""
    from jobs.stages import check_writable
    from raydpo.config import load_config

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path / 'a' / 'b' / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    check_writable(cfg, cfg.tracking, cache=True)
    assert (tmp_path / "a" / "b" / "run").is_dir() and list((tmp_path / "a" / "b" / "run").iterdir()) == []


# --- errors found while the job runs (two real runs of `raydpo train`) -----------------------------


def test_the_error_a_job_reports_is_found_inside_rays_wrappers():
    """Ray's own exception objects around a user's error (a task's, Ray Train's workers' and
    controller's): the job prints the error inside (exit 2); a failed checkpoint write inside them
    is the exit-1 kind; a bug, or a Ctrl-C, is none (it goes on with its traceback)."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from jobs.stages import report_failure, user_failure
    from raydpo.data.pipeline import DataError, DataWorkerLost
    from raydpo.train.loop import CheckpointWriteError

    data = DataError("dropped 100.0% of rows")
    task = RayTaskError("read_rows", "Traceback (most recent call last): ...", data).as_instanceof_cause()
    assert isinstance(task, DataError) and user_failure(task) is data  # the original, not Ray's dual-class copy
    assert user_failure(WorkerGroupError("rank 1 failed", {0: RuntimeError("peer lost"), 1: task})) is data
    assert user_failure(ControllerError(data)) is data
    write = CheckpointWriteError("the checkpoint of step 8 could not be written")
    assert user_failure(WorkerGroupError("rank 0 failed", {0: write})) is write
    assert report_failure(data) == 2 and report_failure(write) == 1
    assert report_failure(DataWorkerLost("the tokenize stage lost its worker on every try")) == 1
    assert user_failure(RuntimeError("a bug")) is None and report_failure(RuntimeError("a bug")) is None
    assert user_failure(KeyboardInterrupt()) is None


def _good(i: int) -> str:
    return json.dumps({"prompt": f"max({i % 97:02d},{i % 89:02d})=", "chosen": "1", "rejected": "2"})


def test_every_row_dropped_shows_the_report_and_exits_2(tmp_path):
    """Rows of the wrong shape, all dropped: the run stops after the data stage with the data
    report (what data-check prints) as its one message, and its MLflow run is FAILED."""
    from mlflow.tracking import MlflowClient

    src = _write(tmp_path / "rows.jsonl", b"".join(json.dumps({"question": f"q{i}", "answer": "a"}).encode() + b"\n"
                                                   for i in range(20)))
    code, err = raydpo("train", QUICKSTART, *quick_args(tmp_path, f"data.train=['{src}']", "data.synthetic=null",
                                                        "data.format=standard"))
    message = fails_with(code, err, "raydpo: dropped 100.0% of rows, over data.max_drop_fraction 10.0%", "data: read 20, kept 0",
                     alone=False)
    assert "missing_field" in message
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"
    assert not (tmp_path / "out" / "final").exists()


def test_a_source_damaged_inside_a_ray_task_exits_2_with_its_message(tmp_path):
    """A gzip cut in the middle passes the driver's checks of its first bytes; the Ray Data read
    task finds the cut and raises a SourceError (an InputError) inside Ray: the job prints that
    message alone, not Ray's wrapping of the task's traceback."""
    import zlib

    full = gzip.compress(("\n".join(_good(i) for i in range(3000)) + "\n").encode())
    cut = _write(tmp_path / "cut.jsonl.gz", full[: len(full) // 2])
    lines = zlib.decompressobj(wbits=31).decompress(cut.read_bytes()).count(b"\n")
    assert 64 < lines < 3000
    code, err = raydpo("train", QUICKSTART, *quick_args(tmp_path, f"data.train=['{cut}']", "data.synthetic=null"))
    fails_with(code, err, f"raydpo: data source {cut}: the gzip stream is truncated after line {lines}", alone=False)
    assert err.count("truncated after line") == 1 and "RayTaskError" not in err
