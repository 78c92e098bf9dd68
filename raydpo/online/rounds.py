"""The state of online DPO on disk: one folder per round, written stage by stage.

``{output_dir}/rounds/{r:03d}/`` holds, in the order they are written:

- ``generations.jsonl``: per training prompt, its k samples (token ids, text, log-probs, version);
- ``scores.jsonl``: the judge's scores and failures per prompt;
- ``pairs.parquet``: the preference pairs (``raydpo.online.pairs``);
- ``reference.parquet``: their reference log-probs, row for row (unless the loss is reference-free);
- ``train/``: the policy update (the rows trained, step by step; then ``train/final``, the round's
  policy; the trainer's checkpoints, one Ray Train run for all rounds, are in ``{output_dir}/trainer``);
- ``trained.json``: the update's last step and metrics, once ``train/final`` is written whole;
- ``eval.json``: the new policy on the fixed evaluation prompts (score, win rate, KL);
- ``round.json``: the round's metrics; written last, so a round is complete when it exists.

Round 0 is the initial policy: only its evaluation (``eval_generations.jsonl``, ``eval.json``).
Every file is written whole to a temporary name and renamed, so a killed run leaves a stage
either complete or absent; a re-run resumes at the first incomplete round and skips every stage
whose file exists, reusing its generations, scores and pairs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


class RoundDir:
    def __init__(self, output_dir: Path, r: int) -> None:
        self.round = r
        self.path = Path(output_dir) / "rounds" / f"{r:03d}"
        self.generations = self.path / "generations.jsonl"
        self.scores = self.path / "scores.jsonl"
        self.pairs = self.path / "pairs.parquet"
        self.reference = self.path / "reference.parquet"  # the pairs' reference log-probs, row for row
        self.train_dir = self.path / "train"
        self.policy = self.train_dir / "final"
        self.trained = self.path / "trained.json"
        self.eval_generations = self.path / "eval_generations.jsonl"
        self.eval = self.path / "eval.json"
        self.done = self.path / "round.json"

    def complete(self) -> bool:
        return self.done.exists()


def first_incomplete(output_dir: Path, rounds: int) -> int:
    """The first round (1-based) without ``round.json``; ``rounds + 1`` when all are complete."""
    return next((r for r in range(1, rounds + 1) if not RoundDir(output_dir, r).complete()), rounds + 1)


def last_trained(output_dir: Path, rounds: int) -> int:
    """The newest round whose training is recorded (``trained.json``: its HF folder is whole); 0
    for none. It may be one past the last complete round: the policy a resumed trainer holds."""
    return max((r for r in range(1, rounds + 1) if RoundDir(output_dir, r).trained.exists()), default=0)


def policy_path(output_dir: Path, r: int, initial: str) -> str:
    """The policy after round ``r`` (round 0: the initial model)."""
    return initial if r == 0 else str(RoundDir(output_dir, r).policy)


def _replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic: the file is whole or absent


def write_json(path: Path, obj: Any) -> None:
    _replace(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    _replace(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


PAIR_SCHEMA = pa.schema([
    ("prompt_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())), ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
    ("prompt_row", pa.int64()),
])


def write_pairs(path: Path, columns: dict[str, list]) -> None:
    write_table(path, pa.table(columns, schema=PAIR_SCHEMA))


def write_table(path: Path, table: pa.Table) -> None:
    _replace(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: Path) -> pa.Table:
    return pq.read_table(path)
