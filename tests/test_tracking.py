"""``raydpo.tracking.Tracker`` against real MLflow: a SQLite store, and a real ``mlflow server`` on
127.0.0.1 that is stopped mid-run and restarted. Every metric read back over HTTP, counted."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raydpo.config import ConfigError, TrackingConfig
from raydpo.tracking import SPOOL_DIR, Tracker, TrackingError, mask_secrets, versions

REPORT = {
    "read": 10, "kept": 7, "pairs": 7, "dropped": {"unparseable": 2, "identical": 1}, "truncated": 1,
    "boundary_fixed": 0, "examples": {"unparseable": ["a.jsonl:3", "a.jsonl:5"], "identical": ["b.jsonl:1"]},
    "sources": {
        "a.jsonl": {"read": 6, "kept": 4, "pairs": 4, "truncated": 1, "boundary_fixed": 0, "dropped": {"unparseable": 2}},
        "b.jsonl": {"read": 4, "kept": 3, "pairs": 3, "truncated": 0, "boundary_fixed": 0, "dropped": {"identical": 1}},
    },
    "splits": {"train": 6, "eval": 1},
    "lengths": {"prompt": {"p50": 12, "p90": 30, "p99": 31, "max": 31},
                "chosen": {"p50": 5, "p90": 9, "p99": 9, "max": 9},
                "rejected": {"p50": None, "p90": None, "p99": None, "max": None}},
}


def settings(uri: str, **kw) -> TrackingConfig:
    return TrackingConfig(uri=uri, experiment="t", system_metrics=False, **kw)


def _table(client: MlflowClient, run_id: str, name: str, tmp: Path) -> list[dict]:
    """An artifact written by ``log_table`` (pandas "split" JSON) as a list of row dicts."""
    data = json.loads(Path(client.download_artifacts(run_id, name, str(tmp))).read_text())
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every logged step of ``key``, duplicates included, sorted."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_report_lengths_and_mixture_read_back(mlflow_uri, tmp_path):
    tracker, resumed = Tracker.start(settings(mlflow_uri), tmp_path / "out", "r")
    assert not resumed
    mixture = {"a.jsonl": {"available": 4, "used": 5, "weight": 0.75}, "b.jsonl": {"available": 3, "used": 2, "weight": 0.25}}
    tracker.log_report(REPORT)
    tracker.log_mixture(mixture)
    assert tracker.finish("FINISHED", timeout=60)

    client = MlflowClient(mlflow_uri)
    run_id = tracker.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"data_report.json", "data_report_table.json", "data_lengths_table.json",
            "data_mixture.json", "data_mixture_table.json"} <= artifacts
    assert json.loads(Path(client.download_artifacts(run_id, "data_report.json", str(tmp_path))).read_text()) == REPORT
    assert json.loads(Path(client.download_artifacts(run_id, "data_mixture.json", str(tmp_path))).read_text()) == mixture
    assert _table(client, run_id, "data_report_table.json", tmp_path) == [
        {"source": "a.jsonl", "read": 6, "kept": 4, "truncated": 1, "dropped_unparseable": 2, "dropped_identical": 0},
        {"source": "b.jsonl", "read": 4, "kept": 3, "truncated": 0, "dropped_unparseable": 0, "dropped_identical": 1},
    ]
    lengths = _table(client, run_id, "data_lengths_table.json", tmp_path)
    assert [r["part"] for r in lengths] == ["prompt", "chosen", "rejected"]
    assert lengths[0] == {"part": "prompt", "p50": 12, "p90": 30, "p99": 31, "max": 31}
    assert all(lengths[2][k] is None for k in ("p50", "max"))  # no kept rejected: unknown, not 0
    assert _table(client, run_id, "data_mixture_table.json", tmp_path) == [
        {"entry": "a.jsonl", "weight": 0.75, "available": 4, "used": 5},
        {"entry": "b.jsonl", "weight": 0.25, "available": 3, "used": 2},
    ]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["data/read"] == 10 and metrics["data/dropped_unparseable"] == 2
    assert {"path": "data_report_table.json", "type": "table"} in json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])

    # A resumed run logs its report again: the tables are replaced, not appended to (MLflow's
    # log_table appends, which listed every row once more per resume).
    again, resumed = Tracker.start(settings(mlflow_uri), tmp_path / "out", "r")
    assert resumed and again.run_id == run_id
    again.log_report(REPORT)
    assert again.finish("FINISHED", timeout=60)
    assert len(_table(client, run_id, "data_report_table.json", tmp_path / "again")) == 2
    assert metrics["data/prompt_tokens_p90"] == 30 and metrics["data/chosen_tokens_max"] == 9
    assert not any(k.startswith("data/rejected_tokens") for k in metrics)


def test_params_are_masked_and_versioned_inputs_logged(mlflow_uri, tmp_path):
    """Secrets never reach MLflow; versions and dataset inputs (source, digest, rows) do; a
    resumed run keeps its first params and its run id."""
    params = {"model.hf_token": "hf_abcdef", "tracking.uri": "http://alice:s3cret@host:5000",
              "train.max_tokens_per_batch": 4096, "data.columns": {"prompt": "q"}, "judge.api_key": "sk-1"}
    assert mask_secrets(params) == {"model.hf_token": "***", "tracking.uri": "http://alice:***@host:5000",
                                    "train.max_tokens_per_batch": 4096, "data.columns": {"prompt": "q"},
                                    "judge.api_key": "***"}
    tracker, _ = Tracker.start(settings(mlflow_uri), tmp_path / "out", "r")
    tracker.log_params(params | versions())
    tracker.log_input("a.jsonl", str(tmp_path / "a.jsonl"), "0123abcd" * 5, context="training", rows=6)
    assert tracker.finish("FINISHED", timeout=60)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    logged = run.data.params
    assert logged["model.hf_token"] == "***" and logged["judge.api_key"] == "***"
    assert "s3cret" not in json.dumps(logged)
    assert logged["train.max_tokens_per_batch"] == "4096" and json.loads(logged["data.columns"]) == {"prompt": "q"}
    assert logged["version/torch"] and logged["version/mlflow"]
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "a.jsonl" and ds.dataset.digest == ("0123abcd" * 5)[:36]
    assert json.loads(ds.dataset.profile) == {"num_rows": 6}
    assert json.loads(ds.dataset.source)["uri"] == str(tmp_path / "a.jsonl") and ds.dataset.source_type == "local"
    assert ds.tags[0].value == "training"

    again, resumed = Tracker.start(settings(mlflow_uri), tmp_path / "out", "r")
    assert resumed and again.run_id == tracker.run_id
    again.log_params({"model.hf_token": "other", "train.new_setting": 1})  # a changed value keeps the first
    assert again.finish("FINISHED", timeout=60)
    logged = client.get_run(tracker.run_id).data.params
    assert logged["model.hf_token"] == "***" and logged["train.new_setting"] == "1"


def test_a_uri_mlflow_has_no_store_for_is_the_users_error_naming_tracking_uri(tmp_path):
    with pytest.raises(ConfigError, match=r"^tracking\.uri: foo://bar: .*unsupported URI 'foo://bar'"):
        Tracker.start(settings("foo://bar"), tmp_path / "out", "r")


def test_unreachable_server_fails_fast_before_any_work(tmp_path):
    from tests.conftest import free_port

    with pytest.raises(TrackingError, match="unreachable"):
        Tracker.start(settings(f"http://127.0.0.1:{free_port()}"), tmp_path / "out", "r")
    assert not (tmp_path / "out" / "mlflow_run_id").exists()


@pytest.mark.slow  # a real server stopped and restarted
def test_server_outage_mid_run_loses_and_duplicates_nothing(mlflow_server, tmp_path):
    """Steps logged while the server is stopped return at once (the spool takes them) and
    arrive, each exactly once and in order, after it restarts on the same port and store. The
    run ends while the server is still down: the driver's finish waits for it and delivers the
    training worker's leftover steps before it marks the run FINISHED."""
    out = tmp_path / "out"
    tracker, _ = Tracker.start(settings(mlflow_server.uri), out, "outage")
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5}, step)
    assert tracker.flush(timeout=60)

    mlflow_server.stop(kill=True)  # a crash: down at once
    for step in range(6, 11):  # "training" goes on while the server is down
        tracker.log_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5}, step)
    deadline = time.monotonic() + 60
    while tracker.outages == 0 and time.monotonic() < deadline:  # the sender tries, fails, keeps the spool
        time.sleep(0.2)
    assert tracker.outages == 1
    assert tracker.spool.pending_count() > 0
    worker = Tracker.open(tracker.spec, "rank0")  # a training worker that ends while the server is down
    for step in range(11, 21):
        worker.log_metrics({"loss": 1.0 / step, "rewards/accuracies": 0.5}, step)
    assert not worker.close(timeout=1)

    restart = threading.Timer(2.0, mlflow_server.start)  # back while the driver is finishing
    restart.start()
    assert tracker.finish("FINISHED", timeout=120)
    restart.join()

    client = MlflowClient(mlflow_server.uri)  # read back over HTTP
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 21))
    assert _steps(client, tracker.run_id, "rewards/accuracies") == list(range(1, 21))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert "nothing lost" in run.data.tags["raydpo.tracking.outage_driver"]


@pytest.mark.slow  # a real server stopped and restarted, `raydpo sync-tracking` twice
def test_spool_left_by_a_run_is_delivered_once_by_sync_tracking(mlflow_server, tmp_path):
    """A run that ends while the server is down keeps its spool; `raydpo sync-tracking` delivers
    it when the server is back, and a second sync sends nothing again. A resume while the server
    is down fails instead of starting a new run."""
    from jobs.sync_tracking import main as sync_main

    out = tmp_path / "out"
    tracker, _ = Tracker.start(settings(mlflow_server.uri), out, "later")
    worker = Tracker.open(tracker.spec, "rank0")  # a training worker's tracker
    mlflow_server.stop(kill=True)  # a crash: down at once
    for step in range(1, 9):
        worker.log_metrics({"loss": 0.1 * step}, step)
    assert not worker.close(timeout=1)
    assert not tracker.finish("FINISHED", timeout=1)
    assert {p.name for p in (out / SPOOL_DIR / tracker.run_id).glob("*.jsonl")} == {"driver.jsonl", "rank0.jsonl"}

    assert sync_main([str(out), "--timeout", "5"]) == 1  # still down: says so, keeps the spool
    mlflow_server.start()
    assert sync_main([str(out), "--timeout", "60"]) == 0
    assert sync_main([str(out), "--timeout", "60"]) == 0
    client = MlflowClient(mlflow_server.uri)
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 9))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    # Resuming while the server is away fails, clearly, instead of taking the run for gone.
    mlflow_server.stop(kill=True)  # a crash: down at once
    with pytest.raises(TrackingError, match="unreachable"):
        Tracker.start(settings(mlflow_server.uri), out, "later")
    assert (out / "mlflow_run_id").read_text().strip() == tracker.run_id


def test_the_model_is_logged_with_mlflow_transformers_and_registered(mlflow_uri, tmp_path):
    """``log_model`` with ``register_as``: a text-generation pipeline that loads back from the
    registry, its tokenizer included."""
    import mlflow.transformers

    from raydpo.models import write_tiny

    folder = write_tiny(tmp_path / "tiny")
    tracker, _ = Tracker.start(settings(mlflow_uri, register_as="raydpo-tiny"), tmp_path / "out", "model")
    tracker.log_model(folder, register_as="raydpo-tiny")
    assert tracker.finish("FINISHED", timeout=120)

    client = MlflowClient(mlflow_uri)
    assert client.get_run(tracker.run_id).data.tags["raydpo.model"] == "mlflow.transformers"
    (version,) = client.search_model_versions("name = 'raydpo-tiny'")
    assert version.run_id == tracker.run_id
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_registry_uri(mlflow_uri)
    pipe = mlflow.transformers.load_model(f"models:/raydpo-tiny/{version.version}")
    assert pipe.task == "text-generation" and pipe.tokenizer is not None
