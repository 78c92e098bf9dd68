"""A dataset-wide shuffle per epoch: which training rows each worker trains on, step by step.

Why: splitting the training set in file order gives each worker the same contiguous slice every
epoch, and puts the upsampled copies of a weighted mixture (adjacent after ``mix_sources``) in the
same global batch. Instead, each epoch permutes the whole training set with a generator seeded by
``(seed, epoch)`` only, never by block order or timing, so a resumed run trains on exactly the
batches of the uninterrupted one. Step ``s`` of an epoch trains on rows ``order[s*G:(s+1)*G]``
(``G = world * local_batch``); worker ``rank`` takes the ``rank``-th run of ``local_batch`` rows
of it. The ``n_rows - steps * G`` rows left over differ from epoch to epoch.

Rows are numbered by their position in the materialized training set, whose order is fixed
(``preserve_order`` in the data pipeline). A worker reads every block once per epoch and keeps only
its own rows, so it holds about ``n_rows / world`` rows, as a split shard would.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

Batch = dict[str, np.ndarray]


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n_rows)``, a function of ``(n_rows, seed, epoch)`` only.
    Shape: (n_rows,), int64."""
    rng = np.random.default_rng([seed % 2**64, epoch])  # SeedSequence takes non-negative ints
    return rng.permutation(n_rows)


def worker_positions(order: np.ndarray, rank: int, world: int, local_batch: int, steps: int) -> np.ndarray:
    """The rows (positions in the training set) worker ``rank`` trains on at each step of an epoch.
    Shape: (steps, local_batch). Step ``s``'s global batch is ``order[s*G:(s+1)*G]`` over all ranks."""
    used = steps * world * local_batch
    if used > len(order):
        raise ValueError(f"{steps} steps of {world} x {local_batch} rows need {used} rows, the training set has {len(order)}")
    return order[:used].reshape(steps, world, local_batch)[:, rank, :]


def take_rows(blocks: Iterable[pa.Table], positions: np.ndarray, n_rows: int) -> Batch:
    """The rows at ``positions`` (any order, no repeats) of the table that ``blocks`` make up in
    sequence, as numpy columns in the order of ``positions``. Holds one block at a time plus the
    rows taken. Raises when the blocks do not hold exactly ``n_rows`` rows."""
    by_position = np.argsort(positions, kind="stable")
    wanted = positions[by_position]  # ascending, so each block's rows are one contiguous run
    pieces: list[Batch] = []
    offset = 0
    for block in blocks:
        lo, hi = np.searchsorted(wanted, [offset, offset + block.num_rows])
        if hi > lo:
            taken = block.take(pa.array(wanted[lo:hi] - offset))
            pieces.append(_numpy(taken))
        offset += block.num_rows
    if offset != n_rows:
        raise ValueError(f"the training blocks hold {offset} rows, expected {n_rows}")
    if not pieces:
        return {}
    restore = np.empty_like(by_position)
    restore[by_position] = np.arange(len(by_position))  # ascending order -> order of positions
    return {k: np.concatenate([p[k] for p in pieces])[restore] for k in pieces[0]}


def _numpy(table: pa.Table) -> Batch:
    """Ray Data's own numpy conversion (what ``iter_batches(batch_format="numpy")`` gives), with
    token-id columns always one object array of int arrays: a block whose lists happen to have
    equal lengths converts to a 2-D array, which does not concatenate with other blocks' rows."""
    out: Batch = {}
    for name, column in BlockAccessor.for_block(table).to_batch_format("numpy").items():
        if column.ndim > 1:
            rows = np.empty(len(column), dtype=object)
            for j, row in enumerate(column):
                rows[j] = row
            column = rows
        out[name] = column
    return out


@dataclass
class ShuffledShard:
    """One worker's batches of the training set, epoch by epoch (see the module docstring).

    ``blocks``: refs to the Arrow blocks of the materialized training set, in its order
    (``MaterializedDataset.to_arrow_refs()``), which the driver keeps alive while training runs.
    """

    blocks: list[Any]  # list[ray.ObjectRef[pa.Table]]
    n_rows: int
    seed: int
    rank: int
    world: int
    local_batch: int
    steps_per_epoch: int

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """``(i, batch)`` for steps ``i = start, ..., steps_per_epoch - 1`` of ``epoch``: each batch
        ``local_batch`` rows. Resuming at ``start`` reads only the rows of the remaining steps."""
        order = epoch_order(self.n_rows, self.seed, epoch)
        positions = worker_positions(order, self.rank, self.world, self.local_batch, self.steps_per_epoch)
        rows = take_rows((ray.get(ref) for ref in self.blocks), positions[start:].ravel(), self.n_rows)
        for k, i in enumerate(range(start, self.steps_per_epoch)):
            part = slice(k * self.local_batch, (k + 1) * self.local_batch)
            yield i, {name: column[part] for name, column in rows.items()}
