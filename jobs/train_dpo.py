"""Offline DPO: read -> tokenize -> reference log-probs (own actor pool) -> Ray Train -> HF folder.

``python -m jobs.train_dpo CONFIG [--set key=value ...] [--verbose]`` (or ``raydpo train``); this
is also what ``ray job submit`` runs. The whole config is seen only here and in ``jobs.stages``.
A SIGTERM checkpoints at the next step and exits 143; the same command resumes (docs/reliability.md).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raydpo import tracking
from raydpo.config import Config
from raydpo.progress import say
from raydpo.tracking import Tracker

if TYPE_CHECKING:
    from actors.preemption import SigtermStop


@dataclass
class Outcome:
    run_id: str
    final_dir: str
    metrics: dict[str, float]
    report: dict[str, Any]
    seconds: float


def train(cfg: Config, tracker: Tracker, stop: SigtermStop):
    """Data -> reference log-probs -> the policy update; returns the data report and the result.
    Raises :class:`Preempted` where ``stop`` had a SIGTERM."""
    from jobs import stages
    from raydpo.data.pipeline import TRAIN_COLUMNS, kept_rows
    from raydpo.train.policy import train_policy

    prepared = stages.prepare(cfg)
    kept, report = stages.data(cfg, prepared, tracker)
    if cfg.loss.needs_reference():
        kept, _ = stages.reference(cfg, prepared.model_path, kept, tracker)
    kept = kept.materialize()
    columns = TRAIN_COLUMNS if cfg.loss.needs_reference() else TRAIN_COLUMNS[:3]
    train_ds = kept_rows(kept, "train").select_columns(columns).materialize()
    eval_ds = kept_rows(kept, "eval").select_columns(columns).materialize()
    stages.save_run_config(cfg, prepared.out)  # what the checkpoints train
    with stop.training(prepared.out):
        result = train_policy(train_ds, eval_ds, model_path=prepared.model_path, out_dir=prepared.out,
                              train=cfg.train, loss=cfg.loss, dtype=cfg.model.dtype, tracker=tracker.spec)
    stop.raise_if_stopped()
    return report, result


def finish(cfg: Config, tracker: Tracker, report: dict[str, Any], result, t0: float) -> Outcome:
    """The model to MLflow, the run closed, and the summary a user reads."""
    if cfg.tracking.log_model:
        tracker.log_model(result.final_dir, cfg.tracking.register_as)
    delivered = tracker.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
    seconds = time.perf_counter() - t0
    say(f"[raydpo] run finished in {seconds:.1f}s; final model {result.final_dir}")
    for key in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in result.metrics:
            say(f"[raydpo]   {key} = {result.metrics[key]:.4f}")
    where = tracking.ui_hint(tracker.spec.uri, tracker.spec.experiment_id, tracker.run_id)
    say(f"[raydpo] MLflow run {tracker.run_id}: {where}"
        + ("" if delivered else " (some tracking data is still spooled, see above)"))
    return Outcome(tracker.run_id, str(result.final_dir), result.metrics, report, seconds)


def run(cfg: Config, config_path: str | None = None, verbose: bool = False) -> Outcome:
    """The whole job. The MLflow run is marked FAILED if anything raises (KILLED on a SIGTERM), and
    a user's error or a failed checkpoint raised inside Ray is raised as itself, unwrapped
    (``stages.failing_run``); re-running the same command resumes it from the latest checkpoint."""
    from actors.preemption import SigtermStop
    from jobs import stages
    from raydpo.train.policy import has_checkpoints  # folders only: not Ray Train's snapshot file

    t0 = time.perf_counter()
    tracker = stages.start_run(cfg, config_path, verbose, job="train",
                               resumable=lambda out: has_checkpoints(str(out / "ray"), "train"))
    with SigtermStop() as stop:  # after start_run: ray.init installs a SIGTERM handler of its own
        with stages.failing_run(tracker, cfg.tracking.flush_timeout_s, stop.preempted):
            report, result = train(cfg, tracker, stop)
    return finish(cfg, tracker, report, result, t0)


def main(argv: list[str] | None = None) -> int:
    from jobs import stages

    return stages.training_job_main(argv, "raydpo train", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
