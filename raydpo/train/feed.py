"""The driver's channel to training workers that live across online rounds.

The driver appends jobs (:class:`TrainRound`, :class:`ScorePairs`, :class:`SendWeights`,
:class:`AwaitSaved`, :class:`Finish`) to a :class:`RoundFeed` actor; every worker takes them in order, job ``i`` after
job ``i - 1``, and rank 0 posts each job's result, which the driver awaits. Jobs are numbered
from 0 for the run; a worker that Ray Train restarts asks :meth:`RoundFeed.start` where to begin
(the first job without a result) and which policy to load (the newest round's, set by the driver
when that round's HF folder is written).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from raydpo.tracking import TrackerSpec


@dataclass(frozen=True)
class TrainRound:
    """Train the policy the workers hold on one round's pairs, from a fresh optimizer; rank 0
    starts writing ``{output_dir}/final`` (:class:`AwaitSaved`). Result: ``{"stopped",
    "last_step", "metrics"}``."""

    round: int
    output_dir: str  # the round's training folder: trained rows, staging, final
    blocks: list[Any]  # refs to the pairs' Arrow blocks, in order (the driver keeps them alive)
    rows: int
    total_steps: int
    steps_per_epoch: int
    step_offset: int  # logged step = step_offset + step: one axis across rounds
    tracker: TrackerSpec | None  # the round's run


@dataclass(frozen=True)
class ScorePairs:
    """Log-probs of each pair's chosen and rejected completions under the policy the workers
    hold, before the round trains it (``online.reference: previous_round``). Result:
    ``{"ref_chosen_logps": [...], "ref_rejected_logps": [...]}`` in row order."""

    blocks: list[Any]
    rows: int


@dataclass(frozen=True)
class SendWeights:
    """Broadcast the policy's weights to ``receivers`` generator ranks over a process group that
    rank 0 hosts; rank 0 posts the group's endpoint (:meth:`RoundFeed.post_endpoint`) before it
    sends. Result: ``{"bytes", "seconds"}``."""

    receivers: int
    timeout_s: float
    bucket_bytes: int  # weights per broadcast


@dataclass(frozen=True)
class AwaitSaved:
    """Wait until rank 0 has written the last trained round's HF folder (it writes it in a thread,
    off the critical path: the sync and the next round's generation do not wait for the disk).
    Result: ``{"path"}``; the write's own error if it failed."""


@dataclass(frozen=True)
class Finish:
    """No more rounds: the workers return and the run ends."""


class RoundFeed:
    """An async Ray actor: ``ray.remote(RoundFeed).remote(model_path)``; workers and the driver
    wait on it without polling."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path  # what a (re)starting worker loads
        self.jobs: list[Any] = []
        self.results: dict[int, Any] = {}
        self.endpoints: dict[int, Any] = {}
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, ready) -> None:
        async with self._changed:
            await self._changed.wait_for(ready)

    async def put(self, job: Any) -> int:
        self.jobs.append(job)
        await self._notify()
        return len(self.jobs) - 1

    async def start(self) -> tuple[str, int]:
        """The policy a starting worker loads and the first job without a result."""
        first = next((i for i in range(len(self.jobs)) if i not in self.results), len(self.jobs))
        return self.model_path, first

    async def next(self, index: int) -> Any:
        await self._wait_for(lambda: len(self.jobs) > index)
        return self.jobs[index]

    async def _post(self, posted: dict[int, Any], index: int, value: Any) -> None:
        posted[index] = value
        await self._notify()

    async def _posted(self, posted: dict[int, Any], index: int) -> Any:
        await self._wait_for(lambda: index in posted)
        return posted[index]

    async def done(self, index: int, result: Any) -> None:
        await self._post(self.results, index, result)

    async def result(self, index: int) -> Any:
        return await self._posted(self.results, index)

    async def post_endpoint(self, index: int, endpoint: Any) -> None:
        await self._post(self.endpoints, index, endpoint)

    async def endpoint(self, index: int) -> Any:
        return await self._posted(self.endpoints, index)

    async def set_model(self, model_path: str) -> None:
        """The newest complete round's policy: what a worker restarted from now loads."""
        self.model_path = model_path
