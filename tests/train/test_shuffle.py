"""The per-epoch shuffle of the whole training set: a function of (seed, epoch) only; each epoch
every row at most once over all workers; workers disjoint; resume reproduces the batches; the
upsampled copies of a mixture are spread over steps, not side by side. Blocks go through a real
local Ray (``MaterializedDataset.to_arrow_refs``), as in training."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray.data

from raydpo.data.pipeline import mix_sources
from raydpo.train.shuffle import ShuffledShard, epoch_order, take_rows, worker_positions

IDS = pa.list_(pa.int32())


def _table(n: int, first_row: int = 0, source: str = "s") -> pa.Table:
    """``n`` rows shaped like the training set, plus ``row`` (a row's identity) and the columns
    ``mix_sources`` reads. Row ``r``'s prompt is ``[r, r]``, its chosen ``[r] * (1 + r % 3)``."""
    rows = np.arange(first_row, first_row + n)
    return pa.table({
        "row": pa.array(rows, pa.int64()),
        "prompt_ids": pa.array([[r, r] for r in rows.tolist()], IDS),
        "chosen_ids": pa.array([[r] * (1 + r % 3) for r in rows.tolist()], IDS),
        "rejected_ids": pa.array([[-r] for r in rows.tolist()], IDS),
        "ref_chosen_logps": pa.array(-rows.astype(np.float32), pa.float32()),
        "ref_rejected_logps": pa.array(-2 * rows.astype(np.float32), pa.float32()),
        "source": pa.array([source] * n, pa.string()),
        "row_id": pa.array(rows.astype(str).tolist(), pa.string()),
        "split": pa.array(["train"] * n, pa.string()),
    })


def _shards(ds: ray.data.Dataset, world: int, local: int, seed: int = 3) -> list[ShuffledShard]:
    blocks, n = ds.to_arrow_refs(), ds.count()
    return [ShuffledShard(blocks, n, seed, rank, world, local, n // (world * local)) for rank in range(world)]


def _epoch_rows(shards: list[ShuffledShard], epoch: int, start: int = 0) -> np.ndarray:
    """Shape: (steps, world, local): the ``row`` of every pair each worker trains on."""
    per_worker = [np.stack([b["row"] for _, b in s.batches(epoch, start)]) for s in shards]
    return np.stack(per_worker, axis=1)


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    a = epoch_order(1000, seed=7, epoch=0)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_order(1000, seed=7, epoch=0))
    assert not np.array_equal(a, epoch_order(1000, seed=7, epoch=1))
    assert not np.array_equal(a, epoch_order(1000, seed=8, epoch=0))
    assert sorted(epoch_order(5, seed=-1, epoch=2).tolist()) == list(range(5))  # any int seed


def test_worker_positions_tile_each_step():
    """Step s's global batch is order[s*G:(s+1)*G], rank r takes the r-th run of ``local`` rows."""
    order = np.arange(100)[::-1]
    got = [worker_positions(order, rank, world=2, local_batch=3, steps=4) for rank in range(2)]
    assert got[0].tolist()[1] == [93, 92, 91] and got[1].tolist()[1] == [90, 89, 88]
    with pytest.raises(ValueError, match="need 120 rows"):
        worker_positions(order, 0, world=4, local_batch=3, steps=10)


def test_take_rows_keeps_the_order_asked_for_and_checks_the_row_count():
    t = _table(10)
    blocks = [t.slice(0, 4), t.slice(4, 0), t.slice(4, 6)]
    got = take_rows(blocks, np.array([9, 0, 5, 3]), 10)
    assert got["row"].tolist() == [9, 0, 5, 3]
    assert [r.tolist() for r in got["chosen_ids"]] == [[9], [0], [5, 5, 5], [3]]
    with pytest.raises(ValueError, match="hold 10 rows, expected 11"):
        take_rows(blocks, np.array([1]), 11)


def test_batches_cover_every_row_at_most_once_and_workers_are_disjoint(ray_local):
    n, world, local = 203, 2, 5  # 20 steps of 10 rows; 3 rows left over per epoch
    ds = ray.data.from_arrow([_table(70), _table(60, 70), _table(73, 130)]).materialize()
    shards = _shards(ds, world, local)
    assert shards[0].steps_per_epoch == 20
    epochs = []
    for epoch in range(3):
        rows = _epoch_rows(shards, epoch)
        assert rows.shape == (20, world, local)
        assert len(set(rows.ravel().tolist())) == 20 * world * local  # each row at most once
        assert not set(rows[:, 0].ravel().tolist()) & set(rows[:, 1].ravel().tolist())
        # Every step's global batch is the next world * local rows of the epoch's permutation.
        assert np.array_equal(rows.ravel(), epoch_order(n, 3, epoch)[: 20 * world * local])
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    # A worker's rows change from epoch to epoch, not only their order.
    assert set(epochs[0][:, 0].ravel().tolist()) != set(epochs[1][:, 0].ravel().tolist())

    _, batch = next(shards[1].batches(0))  # the format the step consumes
    assert batch["prompt_ids"].dtype == object and batch["prompt_ids"][0].dtype == np.int32
    assert [len(c) for c in batch["chosen_ids"]] == [1 + r % 3 for r in batch["row"]]
    assert batch["ref_chosen_logps"].dtype == np.float32
    assert np.array_equal(batch["ref_chosen_logps"], -batch["row"].astype(np.float32))


def test_order_depends_on_rows_not_on_blocks(ray_local):
    """The same rows cut into other blocks give the same batches."""
    one = ray.data.from_arrow([_table(120)]).materialize()
    many = ray.data.from_arrow([_table(120).slice(i, 7) for i in range(0, 120, 7)]).materialize()
    assert np.array_equal(_epoch_rows(_shards(one, 2, 4), 1), _epoch_rows(_shards(many, 2, 4), 1))


def test_resume_at_a_step_yields_the_same_later_batches(ray_local):
    ds = ray.data.from_arrow([_table(50), _table(50, 50)]).materialize()
    shards = _shards(ds, world=2, local=4)
    full = [list(s.batches(1)) for s in shards]
    for rank, s in enumerate(shards):
        resumed = list(s.batches(1, start=7))
        assert [i for i, _ in resumed] == list(range(7, 12))
        for (i, got), (j, want) in zip(resumed, full[rank][7:]):
            assert i == j
            for k in want:
                assert all(np.array_equal(a, b) for a, b in zip(got[k], want[k])), k
    assert list(shards[0].batches(1, start=12)) == []


def test_mixture_copies_are_spread_over_steps(ray_local):
    """Source ``a`` (50 rows) is repeated 4x by an equal-weight mixture with ``b`` (350 rows, 200
    used). In file order the copies sit side by side, so nearly every step holding ``a`` holds a
    row twice; a permutation puts two copies in the same 4-row global batch about 2% of the time."""
    kept = ray.data.from_arrow([_table(50, 0, "a"), _table(350, 1000, "b")]).materialize()
    mixed, counts = mix_sources(kept, {"a": 1.0, "b": 1.0}, seed=0)
    mixed = mixed.materialize()
    assert counts["a"]["used"] == 200 and counts["b"]["used"] == 200
    world, local = 2, 2

    def repeat_fraction(steps: np.ndarray) -> float:
        return float(np.mean([len(set(s.tolist())) < s.size for s in steps]))

    in_file_order = np.concatenate([t["row"].to_numpy() for t in ray.get(mixed.to_arrow_refs())])
    file_fraction = repeat_fraction(in_file_order.reshape(-1, world * local))
    assert file_fraction > 0.4

    shards = _shards(mixed, world, local)
    shuffled = np.concatenate([_epoch_rows(shards, e).reshape(-1, world * local) for e in range(5)])
    assert repeat_fraction(shuffled) < 0.08  # chance: 1 - P(no two copies among 4) ~ 0.02
