"""A synthetic preference task with a checkable answer, deterministic for a seed.

``max``: the prompt asks for the larger of two two-digit numbers; the correct answer is preferred
over the smaller one. A tiny random-init model learns it from a few thousand pairs, and because
held-out prompts are new number pairs, held-out reward accuracy measures learning, not memory.
(Off-by-one sums were tried first: a 2-layer, 64-wide model stays at chance on held-out sums for
1,000 steps, so that task would not show learning within the quickstart's 3-minute budget.)
"""
from __future__ import annotations

import json
import random
from pathlib import Path


def max_rows(n: int, *, seed: int = 0, max_operand: int = 99) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` in TRL's standard format (strings)."""
    rng = random.Random(seed)
    width = len(str(max_operand))
    rows = []
    for _ in range(n):
        a = rng.randint(0, max_operand)
        b = rng.randint(0, max_operand)
        while b == a:
            b = rng.randint(0, max_operand)
        rows.append(
            {
                "prompt": f"max({a:0{width}d},{b:0{width}d})=",
                "chosen": f"{max(a, b):0{width}d}",
                "rejected": f"{min(a, b):0{width}d}",
            }
        )
    return rows


TASKS = {"max": max_rows}


def write_shards(
    out_dir: str | Path, *, task: str = "max", rows: int, shards: int = 2, seed: int = 0
) -> list[str]:
    """Write the task as ``shards`` JSONL files and return their paths. Idempotent."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = TASKS[task](rows, seed=seed)
    paths = []
    for s in range(shards):
        path = out / f"{task}-{s:05d}.jsonl"
        body = "".join(json.dumps(r) + "\n" for r in data[s::shards])
        if not path.exists() or path.read_text() != body:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(body)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a shard
        paths.append(str(path))
    return paths
