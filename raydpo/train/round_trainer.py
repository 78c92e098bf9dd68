"""The policy trainer of an online run: one Ray Train ``fit()`` for every round.

Its workers (model, optimizer, process group) start once per ``raydpo iterate`` and train round
after round on what the driver sends them through a :class:`~raydpo.train.feed.RoundFeed`
(:mod:`raydpo.train.round_loop`). ``fit()`` runs in a thread of the driver; every call here waits
for its job's result and raises the fit's own error (lost workers, a worker's exception) if the
fit ends first. Ray Train's checkpoints of the run live in ``{output_dir}/trainer/ray`` (or under
``train.storage_path``): a round stopped by a SIGTERM resumes from its checkpoint; a round that
finished is resumed from its HF folder.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from raydpo.config import LossConfig, TrainConfig
from raydpo.progress import TrainProgress, say
from raydpo.spool import Spool
from raydpo.tracking import TrackerSpec
from raydpo.train.feed import AwaitSaved, Finish, RoundFeed, ScorePairs, SendWeights, TrainRound
from raydpo.train.loop import LoopArgs
from raydpo.train.policy import checkpoint_location, fit, schedule
from raydpo.train.round_loop import round_loop_per_worker
from raydpo.weight_sync import DEFAULT_BUCKET_BYTES


@dataclass
class Training:
    """A round's training under way: its job, the pairs' blocks it reads, its progress lines."""

    index: int
    blocks: list[Any]
    progress: TrainProgress | None


class TrainerStopped(RuntimeError):
    """The trainer's ``fit()`` ended without an error while a job was waiting for it."""


class RoundTrainer:
    """Start with the policy at ``model_path`` (the newest complete round's, or the initial one)."""

    def __init__(self, model_path: str, out: Path, train: TrainConfig, loss: LossConfig, dtype: str) -> None:
        self.train_settings = train
        self.feed = ray.remote(RoundFeed).options(num_cpus=0).remote(model_path)
        storage_path, name = checkpoint_location(train.storage_path, Path(out) / "trainer")
        base = LoopArgs(train=train, loss=loss, model_path=model_path, output_dir=str(Path(out) / "trainer"),
                        local_batch_size=train.batch_size // train.num_workers, total_steps=1, steps_per_epoch=1,
                        train_blocks=[], train_rows=0, dtype=dtype, has_eval=False)
        self._error: BaseException | None = None
        self._unanswered: set[int] = set()  # jobs put whose result nobody has read: the workers may be busy

        def run() -> None:
            try:
                fit(round_loop_per_worker, {"args": base, "feed": self.feed}, train, storage_path, name)
            except BaseException as e:  # raised in the driver's thread by the job that waits
                self._error = e

        self._thread = threading.Thread(target=run, name="raydpo-trainer", daemon=True)
        self._thread.start()

    def _put(self, job: Any) -> int:
        index = ray.get(self.feed.put.remote(job))
        self._unanswered.add(index)
        return index

    def _result(self, index: int) -> Any:
        value = self._wait(self.feed.result.remote(index))
        self._unanswered.discard(index)
        return value

    def _wait(self, ref: ray.ObjectRef) -> Any:
        """``ref``'s value, or the fit's error if the fit ends first."""
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ref)
            if not self._thread.is_alive():
                if self._error is not None:
                    raise self._error
                raise TrainerStopped("the trainer's workers returned while a job waited for them")

    def begin_train(self, pairs: pa.Table, round: int, output_dir: Path, step_offset: int,
                    tracker: TrackerSpec | None) -> "Training":
        """Start one round's training on ``pairs`` (with reference columns unless the loss is
        reference-free) and return at once; :meth:`end_train` waits for it. ``{output_dir}/final``
        gets the policy unless stopped."""
        _, steps_per_epoch, total = schedule(pairs.num_rows, self.train_settings)
        say(f"[raydpo] training: {pairs.num_rows} pairs, {self.train_settings.num_workers} worker(s), "
            f"{total} steps of {self.train_settings.batch_size} pairs")
        blocks = [ray.put(pairs)]  # held by the Training until the round is trained
        progress = TrainProgress(Spool(tracker.spool_dir, "rank0"), step_offset + total).start() if tracker else None
        index = self._put(TrainRound(round, str(output_dir), blocks, pairs.num_rows, total, steps_per_epoch,
                                     step_offset, tracker))
        return Training(index, blocks, progress)

    def end_train(self, training: "Training") -> dict[str, Any]:
        """``{"stopped", "last_step", "metrics"}`` of a training :meth:`begin_train` started."""
        try:
            return self._result(training.index)
        finally:
            if training.progress:
                training.progress.stop()

    def score(self, pairs: pa.Table) -> dict[str, list[float]]:
        """``ref_chosen_logps`` / ``ref_rejected_logps`` of ``pairs`` under the policy held now."""
        return self._result(self._put(ScorePairs([ray.put(pairs)], pairs.num_rows)))

    def begin_send(self, receivers: int, timeout_s: float, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[int, Any]:
        """Start a weight broadcast to ``receivers`` ranks in buckets of ``bucket_bytes``: the
        job's index and the group's endpoint, to hand the receivers (the broadcast waits for them
        to join)."""
        index = self._put(SendWeights(receivers, timeout_s, bucket_bytes))
        return index, self._wait(self.feed.endpoint.remote(index))

    def end_send(self, index: int) -> dict[str, float]:
        return self._result(index)

    def wait_saved(self) -> str:
        """The folder of the last round trained, once written (rank 0 writes it in the background)."""
        return self._result(self._put(AwaitSaved()))["path"]

    def policy_saved(self, model_path: str) -> None:
        """A worker that Ray Train restarts from now on loads ``model_path``."""
        ray.get(self.feed.set_model.remote(model_path))

    def close(self, timeout_s: float = 60.0) -> None:
        """End the fit. Idle workers return at once. Workers still in a job (the driver failed
        meanwhile) are not waited for: the feed ends, and with it their next call to it, so the
        driver's own error reaches the user without a wait."""
        if self._thread.is_alive():
            self._put(Finish())
            self._thread.join(timeout_s if len(self._unanswered) == 1 else 1.0)  # Finish alone: idle
        ray.kill(self.feed)
