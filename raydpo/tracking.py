"""MLflow: params, config, data report, metrics and the model. The driver owns the run; training
rank 0 logs per-step metrics into it (see ``raydpo.train.loop``).

Everything goes through an explicit ``MlflowClient(uri)``, never MLflow's global active run, so the
driver and the workers name the same store and run without shared state.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

RUN_ID_FILE = "mlflow_run_id"  # in output_dir: a re-run of the same output_dir continues the run


def resolve_uri(uri: str | None) -> str:
    """Config ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's local default; local
    paths made absolute, because Ray workers run in other directories."""
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def start_run(uri: str, experiment: str, run_name: str | None, output_dir: Path | None) -> tuple[MlflowClient, str, bool]:
    """Create the run, or reopen the one this ``output_dir`` started (``None``: always a new run).
    Returns (client, run_id, resumed)."""
    client = MlflowClient(uri)
    id_file = output_dir / RUN_ID_FILE if output_dir is not None else None
    if id_file is not None and id_file.exists():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return client, run_id, True
        except Exception:  # the store was wiped or moved: start a new run
            pass
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name)
    if id_file is not None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
    return client, run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Every resolved config value; MLflow takes at most 100 params per call, 6000 chars each."""
    items = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in sorted(params.items())]
    existing = client.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]  # a resumed run already has them
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(p.key, p.value[:6000]) for p in items[i : i + 100]])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _log_columns(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows of one table -> ``client.log_table``: columns in first-seen order, a missing cell 0."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    client.log_table(run_id, data={k: [r.get(k, 0) for r in rows] for k in columns}, artifact_file=artifact_file)


def log_report(client: MlflowClient, run_id: str, report: dict[str, Any]) -> None:
    """The data report (``DataReport.to_dict()``) as JSON and as tables, plus metrics.

    Artifacts: ``data_report.json`` (the whole dict); ``data_report_table.json`` (a row per source:
    read, kept, truncated, ``dropped_<reason>``); ``data_lengths_table.json`` (a row per part:
    prompt/chosen/rejected, p50/p90/p99/max tokens over kept pairs) when the report has ``lengths``;
    the mixture tables (``log_mixture``) when it has ``mixture``. Metrics: ``data/read``,
    ``data/kept``, ``data/truncated``, ``data/dropped_<reason>``, ``data/<part>_tokens_<stat>``."""
    client.log_dict(run_id, report, "data_report.json")
    rows = [
        {"source": s, "read": c["read"], "kept": c["kept"], "truncated": c["truncated"],
         **{f"dropped_{k}": v for k, v in sorted(c["dropped"].items())}}
        for s, c in report["sources"].items()
    ]
    if rows:
        _log_columns(client, run_id, rows, "data_report_table.json")
    metrics = {"data/read": report["read"], "data/kept": report["kept"], "data/truncated": report["truncated"]}
    metrics |= {f"data/dropped_{reason}": n for reason, n in report["dropped"].items()}
    lengths = report.get("lengths") or {}
    if lengths:
        _log_columns(client, run_id, [{"part": part, **stats} for part, stats in lengths.items()], "data_lengths_table.json")
        metrics |= {f"data/{part}_tokens_{stat}": v for part, stats in lengths.items()
                    for stat, v in stats.items() if v is not None}  # None: no kept pair
    log_metrics(client, run_id, metrics)
    if report.get("mixture"):
        log_mixture(client, run_id, report["mixture"])


def log_mixture(client: MlflowClient, run_id: str, mixture: dict[str, dict[str, Any]]) -> None:
    """The weighted mixture (``pipeline.mix_sources``' counts: entry -> {available, used, weight})
    as ``data_mixture.json`` and ``data_mixture_table.json`` (a row per entry)."""
    client.log_dict(run_id, mixture, "data_mixture.json")
    rows = [{"entry": label, "weight": c["weight"], "available": c["available"], "used": c["used"]}
            for label, c in mixture.items()]
    if rows:
        _log_columns(client, run_id, rows, "data_mixture_table.json")
