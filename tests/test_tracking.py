"""``tracking.log_report`` / ``log_mixture`` against a real MLflow SQLite store: the data report,
its token-length percentiles and the mixture counts come back as JSON, tables and metrics."""
from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from raydpo import tracking

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


def _table(client: MlflowClient, run_id: str, name: str, tmp: Path) -> list[dict]:
    """An artifact written by ``log_table`` (pandas "split" JSON) as a list of row dicts."""
    data = json.loads(Path(client.download_artifacts(run_id, name, str(tmp))).read_text())
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def test_report_lengths_and_mixture_read_back(mlflow_uri, tmp_path):
    client, run_id, _ = tracking.start_run(mlflow_uri, "t", None, None)
    mixture = {"a.jsonl": {"available": 4, "used": 5, "weight": 0.75}, "b.jsonl": {"available": 3, "used": 2, "weight": 0.25}}
    tracking.log_report(client, run_id, REPORT)
    tracking.log_mixture(client, run_id, mixture)

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
    assert metrics["data/prompt_tokens_p90"] == 30 and metrics["data/chosen_tokens_max"] == 9
    assert not any(k.startswith("data/rejected_tokens") for k in metrics)

    # A report that carries its mixture logs it too (a second run: one store is slow to create).
    client, run_id, _ = tracking.start_run(mlflow_uri, "t", None, None)
    report = {**REPORT, "lengths": {}, "mixture": {"a.jsonl": {"available": 4, "used": 4, "weight": 1.0}}}
    tracking.log_report(client, run_id, report)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "data_mixture_table.json" in artifacts and "data_lengths_table.json" not in artifacts
