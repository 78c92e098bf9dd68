"""Offline DPO end to end on a real local Ray, with a real MLflow store."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from raydpo.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TRL_NAMES = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm",
]


def quick(tmp_path: Path, uri: str, *overrides: str):
    """The quickstart config, shrunk, writing under tmp_path."""
    return load_config(
        ROOT / "configs/quickstart.yaml",
        [f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}", "tracking.experiment=test",
         f"reference.cache_dir={tmp_path / 'ref-cache'}", *overrides],
    )


def worker_environ(out: Path, timeout_s: float = 600.0) -> dict[str, str]:
    """The environment of the training worker of the run writing ``out``, read from /proc while
    it trains (its pid: the first line of its trained-rows file); {} if none was seen in time."""
    deadline = time.monotonic() + timeout_s
    rows = out / "trained_rows" / "rank0.jsonl"
    while time.monotonic() < deadline:
        lines = rows.read_text().splitlines() if rows.exists() else []
        if lines:
            try:
                raw = Path(f"/proc/{json.loads(lines[0])['pid']}/environ").read_bytes()
            except (OSError, ValueError, KeyError):
                return {}
            return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        time.sleep(0.2)
    return {}


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step logged twice (a resumed run) keeps its last value."""
    out: dict[int, float] = {}
    for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def outage_while_training(server, out: Path, down_at_step: int, steps_down: int, seen: list[int]) -> None:
    """Once rank 0 has logged ``down_at_step`` steps and MLflow's system-metrics sampler its first
    sample, ``server`` crashes (stopped at once); it is restarted on the same port and store after
    ``steps_down`` more steps (or the end of training, on a slow machine). ``seen`` gets how many
    steps rank 0 logged while it was down."""

    def logged() -> int:
        return sum(f.read_text().count('"op":"metrics"') for f in out.glob("tracking/*/rank0.jsonl"))

    def sampled() -> bool:  # MLflow's sampler stops for good at its first failed request: it must go first
        try:
            metrics = MlflowClient(server.uri).get_run((out / "mlflow_run_id").read_text().strip()).data.metrics
        except Exception:  # no run yet
            return False
        return any(k.startswith("system/") for k in metrics)

    deadline = time.monotonic() + 600
    while not (logged() >= down_at_step and sampled()) and not (out / "final").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop(kill=True)  # a crash: down at once
    down_at = logged()
    while logged() < down_at + steps_down and not (out / "final").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen.append(logged() - down_at)
    server.start()


def test_quickstart_learns_and_is_tracked_through_a_server_outage(ray_local, tmp_path, mlflow_server):
    """The shrunk quickstart against a real `mlflow server` that crashes mid-run (after rank 0
    logged 3 steps and a system-metrics sample) and is restarted 10 steps later on the same port and store. The loss falls,
    held-out accuracy rises well above chance; training never waits for the server, and every
    step's metrics reach it exactly once, with every TRL metric, the data report, the plots and
    the model (mlflow.transformers); the final folder loads as a plain HF model; the training
    worker started with the malloc setting and ``train.env``."""
    from jobs.train_dpo import run

    out = tmp_path / "out"
    uri = mlflow_server.uri
    cfg = quick(tmp_path, uri, "data.synthetic.rows=2600", "train.eval_every=20", "train.log_every=1",
                "train.checkpoint_every=0",
                # MLflow's sampler every 0.5 s (its default: 10 s), so it samples before the outage.
                "train.env={RAYDPO_TEST_MARK: quick, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL: '0.5'}")
    sigint = signal.getsignal(signal.SIGINT)
    environ: list[dict[str, str]] = []
    steps_logged_while_down: list[int] = []
    watchers = [threading.Thread(target=lambda: environ.append(worker_environ(out)), daemon=True),
                threading.Thread(target=outage_while_training, args=(mlflow_server, out, 3, 10, steps_logged_while_down),
                                 daemon=True)]
    for watcher in watchers:
        watcher.start()
    outcome = run(cfg)
    for watcher in watchers:
        watcher.join(timeout=120)
    assert signal.getsignal(signal.SIGINT) is sigint  # Ray Train's handler for the fit does not outlive it
    # The training worker process started with the malloc setting (glibc reads it at start) and train.env.
    assert environ and environ[0].get("MALLOC_MMAP_THRESHOLD_") == "4194304" and environ[0].get("RAYDPO_TEST_MARK") == "quick"
    assert steps_logged_while_down and steps_logged_while_down[0] >= 1  # trained on, not blocked

    client = MlflowClient(uri)  # read back over HTTP
    run_data = client.get_run(outcome.run_id).data
    for name in TRL_NAMES:
        assert name in run_data.metrics, name
    for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "data/read", "data/kept",
                 "reference/rows", "reference/misses", "reference/tokens_per_s"):
        assert name in run_data.metrics, name
    assert run_data.params["loss.beta"] == "0.5"
    assert run_data.params["train.engine"] == "ddp"
    assert run_data.metrics["data/read"] == 2600

    loss = history(uri, outcome.run_id, "loss")
    eval_acc = history(uri, outcome.run_id, "eval_rewards/accuracies")
    steps = sorted(m.step for m in client.get_metric_history(outcome.run_id, "loss"))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 30  # each step once, none missing
    first = sum(loss[s] for s in steps[:5]) / 5
    last = sum(loss[s] for s in steps[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert eval_acc[max(eval_acc)] >= 0.8, eval_acc

    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "data_report.json", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "plots")}
    assert {"training_curves.png", "logps.png", "eval_margins.png"} <= plots
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raydpo.job"] == "train"
    outage_tags = [v for k, v in run.data.tags.items() if k.startswith("raydpo.tracking.outage_")]
    assert outage_tags and all("nothing lost" in v for v in outage_tags)
    assert run.data.params["fingerprint/data"] and run.data.params["version/torch"]
    assert any(k.startswith("system/") for k in run.data.metrics)  # MLflow's sampler on rank 0
    assert run.inputs.dataset_inputs[0].tags[0].value == "training"
    # The model, with mlflow.transformers: it loads back as a text-generation pipeline.
    assert run.data.tags["raydpo.model"] == "mlflow.transformers"
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{outcome.run_id}'")
    import mlflow.transformers

    pipe = mlflow.transformers.load_model(logged.model_uri)
    assert pipe.task == "text-generation"

    final = AutoModelForCausalLM.from_pretrained(outcome.final_dir)
    initial = AutoModelForCausalLM.from_pretrained(out / "initial")
    assert (Path(outcome.final_dir) / "tokenizer.json").exists()
    moved = max((a - b).abs().max().item() for a, b in zip(final.state_dict().values(), initial.state_dict().values()))
    assert moved > 1e-4


def test_bad_rows_are_counted_and_fail_past_the_limit(ray_local, tmp_path, mlflow_uri):
    """Malformed rows are dropped and counted by reason, logged as data/dropped_<reason>; over
    data.max_drop_fraction the run stops before training, showing the report."""
    from jobs.train_dpo import run
    from raydpo.data.pipeline import DataError

    src = tmp_path / "pairs.jsonl"
    good = [{"prompt": f"max({a:02d},{a + 1:02d})=", "chosen": f"{a + 1:02d}", "rejected": f"{a:02d}"} for a in range(40)]
    bad = ['{"prompt": "x", "chosen": "y"}', '{"prompt": "x", "chosen": "", "rejected": "z"}',
           '{"prompt": "x", "chosen": "same", "rejected": "same"}', "{not json", "[1, 2]"]
    src.write_text("".join(json.dumps(r) + "\n" for r in good) + "\n".join(bad) + "\n")
    cfg = quick(tmp_path, mlflow_uri, f"data.train=['{src}']", "data.synthetic=null", "data.max_drop_fraction=0.05")
    with pytest.raises(DataError, match="missing_field"):
        run(cfg)
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
    metrics = MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    assert metrics["data/read"] == 45
    assert metrics["data/kept"] == 40
    assert metrics["data/dropped_missing_field"] == 1
    assert metrics["data/dropped_empty"] == 1
    assert metrics["data/dropped_identical"] == 1
    assert metrics["data/dropped_unparseable"] == 2
    assert not (tmp_path / "out" / "final").exists()
