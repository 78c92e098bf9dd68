"""What the user sees on the console while a job runs: stage lines and training progress, not
Ray's internals.

- :func:`quiet_libraries` keeps Ray Data's execution plans and per-operator resource lines, Ray
  Train's per-report lines and MLflow's store messages off the console (they stay in Ray's log
  folder); warnings still show. ``--verbose`` skips it.
- :class:`TrainProgress` runs in the driver while Ray Train trains: it reads the metrics that
  training rank 0 writes to its tracking spool (``raydpo.spool``) and prints one line per logged
  step (loss, accuracy, margin, pairs/s, ETA) and per eval. The driver does not need the workers'
  output streamed to it for that, so it is not.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from raydpo.spool import Spool


def say(message: str) -> None:
    """One console line (stderr is for errors; progress goes to stdout, flushed)."""
    print(message, flush=True)


class _DropMessages(logging.Filter):
    """Drops console records that start with one of ``prefixes`` (advice about the very settings
    :func:`quiet_libraries` chose)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Libraries' INFO chatter and progress bars off the driver's console, before any work."""
    import mlflow  # noqa: F401  (its import sets its loggers to INFO: set them after)
    import ray.data
    import transformers

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # per-operator bars and, off a terminal, logged progress blocks
    ctx.print_on_execution_start = False  # "Execution plan of Dataset ..."
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    for name in ("ray.data", "ray.train", "ray.tune", "ray", "mlflow"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            # Ray Data's file handler keeps everything in Ray's log folder; only the console quiets.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
                handler.addFilter(_DropMessages("Progress bars disabled"))
        if name in ("ray.train", "ray.tune", "mlflow"):
            logger.setLevel(logging.WARNING)


class TrainProgress:
    """Prints training progress from rank 0's spool until :meth:`stop` (a daemon thread).

    ``total_steps`` and ``pairs_per_step`` (the global batch) give the ETA; a resumed run counts
    its rate from the first step it trained itself."""

    def __init__(self, spool: Spool, total_steps: int, out: Callable[[str], None] = say,
                 interval_s: float = 1.0) -> None:
        self.spool, self.total, self.out, self.interval = spool, total_steps, out, interval_s
        self._offset = spool.path.stat().st_size if spool.path.exists() else 0  # earlier runs' lines: not news
        self._first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydpo-progress", daemon=True)

    def start(self) -> "TrainProgress":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()  # the last lines

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def _drain(self) -> None:
        for op, offset in self.spool.pending_from(self._offset):
            self._offset = offset
            if op.get("op") == "metrics":
                line = self.line(op["step"], op["values"], time.monotonic())
                if line:
                    self.out(line)

    def line(self, step: int, values: dict[str, float], now: float) -> str | None:
        """The console line for one logged metrics record (None: not a step or eval record)."""
        if "eval_loss" in values:
            return (f"[raydpo] eval at step {step}: loss {values['eval_loss']:.4f} "
                    f"acc {values.get('eval_rewards/accuracies', float('nan')):.3f} "
                    f"margin {values.get('eval_rewards/margins', float('nan')):.3f}")
        if "loss" not in values:
            return None
        if self._first is None:
            self._first = (step, now)
        eta = ""
        done = step - self._first[0]
        if done > 0 and step < self.total:
            left = (now - self._first[1]) / done * (self.total - step)
            eta = f" ETA {int(left // 60)}m{int(left % 60):02d}s"
        return (f"[raydpo] step {step}/{self.total} loss {values['loss']:.4f} "
                f"acc {values.get('rewards/accuracies', float('nan')):.3f} "
                f"margin {values.get('rewards/margins', float('nan')):.3f} "
                f"pairs/s {values.get('pairs_per_s', float('nan')):.2f}{eta}")
