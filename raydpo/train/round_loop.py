"""The Ray Train worker function of an online run: one worker group for every round.

Set up once (tokenizer, policy, engine, process group), then take the driver's jobs from the
:class:`~raydpo.train.feed.RoundFeed` in order until :class:`~raydpo.train.feed.Finish`:

- :class:`TrainRound`: restart the optimizer (a round trains the previous round's policy from a
  fresh AdamW, as a new trainer would), train the round's steps (:func:`raydpo.train.loop.train_steps`),
  write the round's HF folder. A checkpoint of this round (a SIGTERM's, or ``train.checkpoint_every``'s)
  is resumed from; one of an earlier round is not (the round's starting policy is its HF folder);
- :class:`ScorePairs`: the pairs' log-probs under the policy held now, before the round trains it
  (the reference of ``online.reference: previous_round``, with no reference model at all);
- :class:`SendWeights`: the policy's weights to the generators over a process group of their own.

Rank 0 posts each job's result; every rank runs every job (ZeRO-3 gathers collectively).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist

from raydpo.logprobs import pair_batch, scorer_of, to_device
from raydpo.train.adapters import hf_weights
from raydpo.train.engine import OptimConfig
from raydpo.train.feed import Finish, ScorePairs, SendWeights, TrainRound
from raydpo.train.loop import LoopArgs, Worker, _say, load_checkpoint, save_final, set_up, train_steps
from raydpo.train.step import RunningMean


def round_loop_per_worker(config: dict[str, Any]) -> None:
    base: LoopArgs = config["args"]  # the settings every round shares; the rest comes per job
    feed = config["feed"]
    model_path, index = ray.get(feed.start.remote())
    w = set_up(replace(base, model_path=model_path))
    checkpoint = ray.train.get_checkpoint()  # ray: a stopped round's, if any
    while not isinstance(job := ray.get(feed.next.remote(index)), Finish):
        if isinstance(job, TrainRound):
            result = train_round(w, base, job, checkpoint)
            checkpoint = None  # only the first round a worker trains can resume one
        elif isinstance(job, ScorePairs):
            result = score_pairs(w, base, job)
        elif isinstance(job, SendWeights):
            result = send_weights(w, job, lambda endpoint, i=index: ray.get(feed.post_endpoint.remote(i, endpoint)))
        else:
            raise TypeError(f"unknown job {type(job).__name__}")
        if w.rank == 0:
            ray.get(feed.done.remote(index, result))
        index += 1


def _round_of(checkpoint: ray.train.Checkpoint) -> int:
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / "loop_state.json").read_text()).get("round", 0))


def train_round(w: Worker, base: LoopArgs, job: TrainRound, checkpoint: ray.train.Checkpoint | None) -> dict[str, Any]:
    """COLLECTIVE: one round's training on the policy the workers hold."""
    args = replace(base, output_dir=job.output_dir, total_steps=job.total_steps, steps_per_epoch=job.steps_per_epoch,
                   train_blocks=job.blocks, train_rows=job.rows, tracker=job.tracker, step_offset=job.step_offset,
                   has_eval=False, round=job.round)
    w.engine.restart_optimizer(OptimConfig.from_train(base.train, job.total_steps))
    torch.manual_seed(base.train.seed)  # dropout draws as a trainer started for this round would
    bco, start_step = RunningMean(), 0
    if checkpoint is not None and _round_of(checkpoint) == job.round:
        with checkpoint.as_directory() as d:
            start_step = load_checkpoint(w.engine, bco, Path(d), checkpoint.path)
        if w.rank == 0:
            _say(f"[raydpo] round {job.round}: resumed at step {start_step}/{job.total_steps}")
    steps = train_steps(w, args, bco, start_step)
    if not steps.stopped:
        save_final(w, args)
    return {"stopped": steps.stopped, "last_step": job.step_offset + steps.step, "metrics": steps.metrics}


def _rows(blocks: list[Any]) -> pa.Table:
    return pa.concat_tables([ray.get(b) for b in blocks]).combine_chunks()


def score_pairs(w: Worker, base: LoopArgs, job: ScorePairs) -> dict[str, list[float]]:
    """COLLECTIVE: rank r scores rows r, r + world, ... in micro-batches of
    ``train.micro_batch_size`` pairs, in the engine's precision and layout, as the round's first
    forward will (so at step 0 the rewards are 0 to the last bit where the batches agree). Every
    rank runs the same number of forwards (ZeRO-3 gathers parameters in each): short ranks repeat
    a row and drop its result."""
    table, n, world = _rows(job.blocks), job.rows, w.world
    per_rank = -(-n // world)
    mine = list(range(w.rank, n, world))
    mine += mine[-1:] * (per_rank - len(mine)) if mine else [0] * per_rank
    size = base.train.micro_batch_size
    columns = {k: table[k].to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    found: dict[int, tuple[float, float]] = {}
    w.engine.module.eval()
    with torch.no_grad():
        for lo in range(0, per_rank, size):
            rows = mine[lo: lo + size]
            layout = pair_batch([columns["prompt_ids"][i] for i in rows], [columns["chosen_ids"][i] for i in rows],
                                [columns["rejected_ids"][i] for i in rows], w.pad_id, **w.layout)
            with w.engine.autocast():
                logps = scorer_of(w.engine.module)(**to_device(layout, w.engine.device)).logps.double().cpu()
            k = len(rows)
            for j, i in enumerate(rows):
                found[i] = (float(logps[j]), float(logps[k + j]))
    w.engine.module.train()
    if world > 1:
        parts: list[dict[int, tuple[float, float]] | None] = [None] * world
        dist.all_gather_object(parts, found)
        found = {i: v for part in parts for i, v in (part or {}).items()}
    chosen = np.array([found[i][0] for i in range(n)], dtype=np.float32)
    rejected = np.array([found[i][1] for i in range(n)], dtype=np.float32)
    return {"ref_chosen_logps": chosen.tolist(), "ref_rejected_logps": rejected.tolist()}


def send_weights(w: Worker, job: SendWeights, post_endpoint) -> dict[str, float]:
    """COLLECTIVE: every rank gathers the full weights (ZeRO-3: parameter shards, to rank 0);
    rank 0 hosts the sync group, posts its endpoint for the driver to hand the generators, and
    broadcasts the weights under their HF names."""
    from raydpo.weight_sync import WeightSender

    state = w.engine.full_state_dict()  # rank 0: a CPU copy; the next round may train at once
    result: dict[str, float] = {}
    if w.rank == 0:
        weights = hf_weights(w.lm, state, prefix="lm.")
        sender = WeightSender.open(job.receivers, w.engine.device, job.timeout_s)
        try:
            post_endpoint(sender.endpoint)
            stats = sender.send(weights.items())
            result = {"bytes": float(stats.bytes), "seconds": float(stats.seconds)}
        finally:
            sender.close()
    if dist.is_initialized():
        dist.barrier()
    return result
