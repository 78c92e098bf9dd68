"""Time the quickstart end to end and report its held-out accuracy and the metric names it logs.

    python bench/quickstart.py [--set key=value ...]

Prints one JSON object. Wall time counts from before Ray starts to the final model on disk (the
process start and `import` of torch/ray are in `process_s`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

from mlflow.tracking import MlflowClient  # noqa: E402

from jobs.train_dpo import run  # noqa: E402
from raydpo.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    ns = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="raydpo-bench-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp / 'out'}", f"tracking.uri={uri}", *ns.overrides])
    outcome = run(cfg)
    names = sorted(MlflowClient(uri).get_run(outcome.run_id).data.metrics)
    result = {
        "job_s": round(outcome.seconds, 1),
        "process_s": round(time.perf_counter() - T0, 1),
        "eval_rewards/accuracies": round(outcome.metrics.get("eval_rewards/accuracies", float("nan")), 4),
        "eval_loss": round(outcome.metrics.get("eval_loss", float("nan")), 4),
        "train_pairs": outcome.report["splits"].get("train"),
        "eval_pairs": outcome.report["splits"].get("eval"),
        "metrics_logged": names,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
