"""A SIGTERM of a training job's driver (spot preemption, ``ray job stop``, Kubernetes deleting
the pod) stops training at the next step boundary with a checkpoint, instead of losing the steps
since the last one; re-running the same command resumes from it.

The driver holds a :class:`StopSignal` actor, named for the training's output folder and its Ray
job, while Ray Train trains; the workers' loop asks it before each step
(``raydpo.train.loop.StopCheck``). A SIGTERM before or between trainings (reading data, the
reference pass, an online round's generation) has no step to checkpoint: it stops the driver at
once with :class:`Preempted`, keeping what those stages saved (finished reference-cache blocks, a
round's completed parts).

Why not the workers' own SIGTERM: Ray 2.60's worker process handles SIGTERM itself (it exits,
``ray/_private/worker.py`` ``Worker.main_loop``), and the training function runs in a thread of
it, where Python cannot install a handler. A worker whose node is terminated dies like a killed
one; ``train.max_failures`` restarts the group from the latest checkpoint.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray

from raydpo.progress import say

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(BaseException):
    """The driver was asked to stop. A BaseException, like KeyboardInterrupt, so that no library's
    ``except Exception`` on the way out swallows it."""

    def __init__(self, step: int | None) -> None:
        self.step = step  # the checkpointed step; None: stopped outside training
        where = (f"at step {step}: checkpointed" if step else
                 "before training: nothing to checkpoint (finished stages keep what they saved)")
        super().__init__(f"preempted (SIGTERM) {where}; re-run the same command to resume")


@ray.remote(num_cpus=0)
class StopSignal:
    """Set by the driver's SIGTERM handler, read by training rank 0 before each step."""

    def __init__(self) -> None:
        self._requested = False
        self._stopped_at: int | None = None

    def request(self) -> None:
        self._requested = True

    def requested(self) -> bool:
        return self._requested

    def stopped(self, step: int) -> None:
        self._stopped_at = step

    def stopped_at(self) -> int | None:
        return self._stopped_at


class SigtermStop:
    """``with SigtermStop() as stop:`` around a job's work, after ``ray.init`` (which installs a
    SIGTERM handler of its own); the previous handler is back on exit. A second SIGTERM stops at
    once. Outside the main thread (no signals there) it only runs :meth:`training` plainly."""

    def __init__(self) -> None:
        self.actor = None  # the StopSignal while a training runs
        self.received = False
        self.stopped_at: int | None = None  # the step the last training stopped at, if asked to stop
        self._previous = None
        self._installed = False

    def __enter__(self) -> "SigtermStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.received or self.actor is None:
            raise Preempted(None)  # nothing to checkpoint now, or a second SIGTERM
        self.received = True
        say("[raydpo] SIGTERM: the workers checkpoint at the next step boundary and stop")
        self.actor.request.remote()

    @contextmanager
    def training(self, out_dir: Path) -> Iterator[None]:
        """Around one ``train_policy`` call writing ``out_dir``. Afterwards ``stopped_at`` holds
        the step its workers stopped at, if a SIGTERM asked them to (else None)."""
        from raydpo.train.loop import stop_signal_name

        name = stop_signal_name(str(out_dir), ray.get_runtime_context().get_job_id())
        self.stopped_at = None
        self.actor = StopSignal.options(name=name).remote()
        try:
            yield
            if self.received:
                self.stopped_at = ray.get(self.actor.stopped_at.remote())
        finally:
            actor, self.actor = self.actor, None
            ray.kill(actor)
            try:  # until it is dead and its name free: a next training of this folder makes it again
                ray.get(actor.requested.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass

    def raise_if_stopped(self) -> None:
        """After :meth:`training`: :class:`Preempted` if its workers stopped early."""
        if self.stopped_at is not None:
            raise Preempted(self.stopped_at)
