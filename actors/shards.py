"""Work split over a pool of actors, surviving actors that die: each actor gets one contiguous
shard of the items; a shard whose actor died (its process killed, its node lost) is run again on
a replacement. The pools of generators and reward models share it."""
from __future__ import annotations

from typing import Any, Callable


def bounds(n_items: int, n_actors: int) -> list[tuple[int, int, int]]:
    """``(actor, lo, hi)`` for every non-empty contiguous shard of ``n_items``."""
    edges = [n_items * i // n_actors for i in range(n_actors + 1)]
    return [(i, lo, hi) for i, (lo, hi) in enumerate(zip(edges, edges[1:])) if hi > lo]


def run_sharded(n_items: int, n_actors: int, call: Callable[[int, int, int], Any],
                replace: Callable[[int, Exception], None], max_restarts: int) -> list[Any]:
    """``call(actor, lo, hi)`` returns an object ref for one shard; every shard's result, in
    order. An actor's death calls ``replace(actor, error)`` and runs its shard again, up to
    ``max_restarts`` times per call (then the error is raised)."""
    import ray

    shards = bounds(n_items, n_actors)
    refs = {i: call(i, lo, hi) for i, lo, hi in shards}
    out: dict[int, Any] = {}
    restarts = 0
    for i, lo, hi in shards:
        while i not in out:
            try:
                out[i] = ray.get(refs[i])
            except ray.exceptions.RayActorError as e:
                restarts += 1
                if restarts > max_restarts:
                    raise
                replace(i, e)
                refs[i] = call(i, lo, hi)
    return [out[i] for i, _, _ in shards]
