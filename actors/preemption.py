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


class Preempted(KeyboardInterrupt):
    """The driver was asked to stop. A KeyboardInterrupt, so no library's ``except Exception`` on
    the way out swallows it, and because Ray's ``ray.get`` runs signal handlers while it waits and
    passes on only a KeyboardInterrupt raised there, as one of its own (any other exception is
    lost there, and the wait goes on): :class:`SigtermStop` turns that back into this."""

    def __init__(self, step: int | None, finished: bool = False) -> None:
        self.step = step  # the checkpointed step; None: stopped outside training, or after it finished
        self.finished = finished  # the SIGTERM came during the last step: the training finished first
        where = ("when training had finished: its result is saved" if finished else
                 f"at step {step}: checkpointed" if step else
                 "outside training: nothing to checkpoint (the reference-cache blocks and round "
                 "parts already written are kept)")
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
        self.raised: Preempted | None = None  # what the handler raised, to stop at once
        self._previous = None
        self._installed = False

    def __enter__(self) -> "SigtermStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
        preempted = self.preempted(exc)
        if preempted is not None and preempted is not exc:
            raise preempted from None  # Ray's KeyboardInterrupt for ours

    def preempted(self, error: BaseException | None) -> "Preempted | None":
        """The :class:`Preempted` that ``error`` is: itself, or the one the handler raised where
        Ray's ``ray.get`` passed it on as a plain KeyboardInterrupt; None for any other error."""
        if isinstance(error, Preempted):
            return error
        if isinstance(error, KeyboardInterrupt) and self.raised is not None:
            return self.raised
        return None

    def _handle(self, signum, frame) -> None:
        if self.received or self.actor is None:  # nothing to checkpoint now, or a second SIGTERM
            self.raised = Preempted(None)
            raise self.raised
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
        """After :meth:`training`: :class:`Preempted` if a SIGTERM came, whether its workers
        stopped early or had already begun the last step (then the training finished first, and
        the job still stops here rather than go on to its next stage or round)."""
        if self.stopped_at is not None:
            raise Preempted(self.stopped_at)
        if self.received:
            raise Preempted(None, finished=True)
