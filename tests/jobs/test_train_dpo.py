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


def test_quickstart_learns_and_is_tracked(ray_local, tmp_path, mlflow_uri):
    """The shrunk quickstart: loss falls, held-out accuracy rises well above chance, every TRL
    metric and the data report reach MLflow, and the final folder loads as a plain HF model."""
    from jobs.train_dpo import run

    cfg = quick(tmp_path, mlflow_uri, "data.synthetic.rows=2600", "train.eval_every=20", "train.log_every=1",
                "train.checkpoint_every=0", "train.env={RAYDPO_TEST_MARK: quick}")
    sigint = signal.getsignal(signal.SIGINT)
    environ: list[dict[str, str]] = []
    watcher = threading.Thread(target=lambda: environ.append(worker_environ(tmp_path / "out")), daemon=True)
    watcher.start()
    outcome = run(cfg)
    watcher.join(timeout=10)
    assert signal.getsignal(signal.SIGINT) is sigint  # Ray Train's handler for the fit does not outlive it
    # The training worker process started with the malloc setting (glibc reads it at start) and train.env.
    assert environ and environ[0].get("MALLOC_MMAP_THRESHOLD_") == "4194304" and environ[0].get("RAYDPO_TEST_MARK") == "quick"

    client = MlflowClient(mlflow_uri)
    run_data = client.get_run(outcome.run_id).data
    for name in TRL_NAMES:
        assert name in run_data.metrics, name
    for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "data/read", "data/kept",
                 "reference/rows", "reference/misses", "reference/tokens_per_s"):
        assert name in run_data.metrics, name
    assert run_data.params["loss.beta"] == "0.5"
    assert run_data.params["train.engine"] == "ddp"
    assert run_data.metrics["data/read"] == 2600

    loss = history(mlflow_uri, outcome.run_id, "loss")
    eval_acc = history(mlflow_uri, outcome.run_id, "eval_rewards/accuracies")
    steps = sorted(loss)
    assert steps == list(range(1, len(steps) + 1))
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
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "initial")
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


def test_resume_with_a_changed_config_fails_naming_the_keys(ray_local, tmp_path, mlflow_uri, capsys):
    """Re-running an output_dir that holds checkpoints: a change that alters the trajectory
    (batch size, data, loss) fails before any work, naming the keys and how to start fresh; a
    harmless change (logging, eval cadence) resumes."""
    from jobs.train_dpo import main, run
    from raydpo.config import ConfigError

    common = ["data.synthetic.rows=300", "train.max_steps=4", "train.checkpoint_every=2", "data.eval_fraction=0.0"]
    first = run(quick(tmp_path, mlflow_uri, *common))
    with pytest.raises(ConfigError) as e:
        run(quick(tmp_path, mlflow_uri, *common, "train.batch_size=8", "train.micro_batch_size=8", "loss.beta=0.2"))
    assert "train.batch_size: 32 -> 8" in str(e.value) and "loss.beta: 0.5 -> 0.2" in str(e.value)
    assert "micro_batch_size" not in str(e.value) and "new output_dir" in str(e.value)
    config = tmp_path / "changed.yaml"
    config.write_text((ROOT / "configs/quickstart.yaml").read_text())
    argv = [str(config), *(f"--set={o}" for o in [f"output_dir={tmp_path / 'out'}", f"tracking.uri={mlflow_uri}",
                                                  "tracking.experiment=test", *common, "data.synthetic.rows=301"])]
    assert main(argv) == 2
    assert "data.synthetic.rows: 300 -> 301" in capsys.readouterr().err
    again = run(quick(tmp_path, mlflow_uri, *common, "train.log_every=2", "train.eval_every=3"))
    assert again.run_id == first.run_id


def test_training_goes_on_while_the_mlflow_server_is_down(ray_local, tmp_path, mlflow_server):
    """A real `mlflow server` stopped mid-run (after rank 0 logged a few steps) and restarted
    later on the same port and store: training never waits for it, and every step's metrics
    reach the server exactly once."""
    from jobs.train_dpo import run

    out = tmp_path / "out"
    steps_logged_while_down: list[int] = []

    def logged() -> int:
        return sum(f.read_text().count('"op":"metrics"') for f in out.glob("tracking/*/rank0.jsonl"))

    def outage() -> None:
        deadline = time.monotonic() + 600
        while logged() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        mlflow_server.stop(kill=True)  # a crash: down at once
        down_at = logged()
        # Training goes on meanwhile: wait for 10 more steps (or the end of training, on a slow machine).
        while logged() < down_at + 10 and not (out / "final").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        steps_logged_while_down.append(logged() - down_at)
        mlflow_server.start()

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    outcome = run(quick(tmp_path, mlflow_server.uri, "train.log_every=1",
                        "train.eval_every=0", "train.checkpoint_every=0", "tracking.log_model=false"))
    watcher.join(timeout=120)
    assert steps_logged_while_down and steps_logged_while_down[0] >= 1  # trained on, not blocked

    client = MlflowClient(mlflow_server.uri)
    steps = sorted(m.step for m in client.get_metric_history(outcome.run_id, "loss"))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 30  # each step once, none missing
    run_info = client.get_run(outcome.run_id)
    assert run_info.info.status == "FINISHED"
    outage_tags = [v for k, v in run_info.data.tags.items() if k.startswith("raydpo.tracking.outage_")]
    assert outage_tags and all("nothing lost" in v for v in outage_tags)
