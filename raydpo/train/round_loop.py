"""The Ray Train worker function of an online run: one worker group for every round.

Set up once (tokenizer, policy, engine, process group), then take the driver's jobs from the
:class:`~raydpo.train.feed.RoundFeed` in order until :class:`~raydpo.train.feed.Finish`:

- :class:`TrainRound`: restart the optimizer (a round trains the previous round's policy from a
  fresh AdamW, as a new trainer would), train the round's steps (:func:`raydpo.train.loop.train_steps`),
  write the round's HF folder. A checkpoint of this round (a SIGTERM's, or ``train.checkpoint_every``'s)
  is resumed from; one of an earlier round is not (the round's starting policy is its HF folder);
- :class:`ScorePairs`: the pairs' log-probs under the policy held now, before the round trains it
  (the reference of ``online.reference: previous_round``, with no reference model at all);
- :class:`SendWeights`: the policy's weights to the generators over a process group of their own;
- :class:`AwaitSaved`: the end of the HF folder's write, which rank 0 runs in a thread after a
  round's training, so the sync and the next round's generation do not wait for the disk (under
  ZeRO-3 the folder is streamed out in the foreground instead, one gathered tensor at a time, and
  the sync streams the same way: no worker ever holds the whole model).

Rank 0 posts each job's result; every rank runs every job (ZeRO-3 gathers collectively).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydpo.logprobs import pair_batch, scorer_of, to_device
from raydpo.train.adapters import hf_specs, hf_weights, save_streamed, write_hf_folder
from raydpo.train.engine import OptimConfig
from raydpo.train.adapters import save_final as save_final_folder
from raydpo.train.feed import AwaitSaved, Finish, ScorePairs, SendWeights, TrainRound
from raydpo.train.loop import LoopArgs, Worker, _say, load_checkpoint, set_up, train_steps
from raydpo.train.step import RunningMean


class Trained:
    """Rank 0's copy of the last trained round's weights (what its HF folder gets and a sync
    sends: gathered once, held until sent) and the thread that writes the folder. ``held`` is the
    same on every rank (whether a sync must gather first: a collective).

    Under ZeRO-3 (a plain model) nothing is held: the folder is streamed out one gathered tensor at
    a time, in the foreground (every rank takes part), and a sync streams the weights the same way,
    so no process ever holds the whole model."""

    def __init__(self) -> None:
        self.held = False
        self.state: dict[str, torch.Tensor] | None = None
        self.folder: Path | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def keep(self, w: Worker, folder: Path) -> None:
        """COLLECTIVE: gather the weights (ZeRO-3: to rank 0) and start writing ``folder``:
        whole or absent (written beside it, then renamed)."""
        self.wait()
        tmp = folder.with_name(folder.name + ".tmp")
        self.folder, self.error = folder, None
        if w.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)  # a folder of a try that failed before its record
        if _streamed(w):
            self.held, self.state = False, None
            save_streamed(w.lm, w.engine, w.tokenizer, tmp)
            if w.rank == 0:
                os.replace(tmp, folder)
            return
        state = w.engine.full_state_dict()
        self.held, self.state = True, (state if w.rank == 0 else None)
        if w.rank != 0:
            return

        def write() -> None:
            try:
                if _peft(w):  # save_final consumes a PEFT model's state (it merges in place): it writes from a copy
                    save_final_folder(w.lm, {k: v.clone() for k, v in state.items()}, w.tokenizer, tmp, prefix="lm.")
                else:
                    specs = hf_specs(w.lm)
                    write_hf_folder(w.lm, specs, ((s.name, state["lm." + s.name]) for s in specs), w.tokenizer, tmp)
                os.replace(tmp, folder)
            except BaseException as e:  # raised by the AwaitSaved job
                self.error = e

        self.thread = threading.Thread(target=write, name="raydpo-save-round", daemon=True)
        self.thread.start()

    def wait(self) -> dict[str, str]:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise RuntimeError(f"the round's policy could not be written to {self.folder}") from self.error
        return {"path": str(self.folder)}


def _peft(w: Worker) -> bool:
    return hasattr(w.lm, "peft_config")


def _streamed(w: Worker) -> bool:
    """Whether the weights leave this worker group one gathered tensor at a time (ZeRO-3, no
    adapters to merge), never whole on rank 0."""
    return getattr(w.engine, "zero_stage", None) == 3 and not _peft(w)


def round_loop_per_worker(config: dict[str, Any]) -> None:
    base: LoopArgs = config["args"]  # the settings every round shares; the rest comes per job
    feed = config["feed"]
    model_path, index = ray.get(feed.start.remote())
    w = set_up(replace(base, model_path=model_path), ray.train.torch.get_device())  # ray: this worker's GPU, or the CPU
    checkpoint = ray.train.get_checkpoint()  # ray: a stopped round's, if any
    trained = Trained()
    while not isinstance(job := ray.get(feed.next.remote(index)), Finish):
        if isinstance(job, TrainRound):
            result = train_round(w, base, job, checkpoint, trained)
            checkpoint = None  # only the first round a worker trains can resume one
        elif isinstance(job, ScorePairs):
            result = score_pairs(w, base, job)
        elif isinstance(job, SendWeights):
            result = send_weights(w, job, trained,
                                  lambda endpoint, i=index: ray.get(feed.post_endpoint.remote(i, endpoint)))
        elif isinstance(job, AwaitSaved):
            result = trained.wait()
        else:
            raise TypeError(f"unknown job {type(job).__name__}")
        if w.rank == 0:
            ray.get(feed.done.remote(index, result))
        index += 1
    trained.wait()


def _round_of(checkpoint: ray.train.Checkpoint) -> int:
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / "loop_state.json").read_text()).get("round", 0))


def train_round(w: Worker, base: LoopArgs, job: TrainRound, checkpoint: ray.train.Checkpoint | None,
                trained: Trained) -> dict[str, Any]:
    """COLLECTIVE: one round's training on the policy the workers hold; its HF folder is then
    written in the background (``trained``)."""
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
        trained.keep(w, Path(job.output_dir) / "final")
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


def send_weights(w: Worker, job: SendWeights, trained: Trained, post_endpoint) -> dict[str, float]:
    """COLLECTIVE: rank 0 hosts the sync group, posts its endpoint for the driver to hand the
    generators, and broadcasts the last trained round's weights (gathered once, after its
    training) under their HF names."""
    from raydpo.weight_sync import WeightSender

    result: dict[str, float] = {}
    if _streamed(w) and not trained.held:
        # Every tensor under its HF name (tied aliases too, as a receiver's load expects), gathered
        # one at a time as the sender's buckets take them: the gathers are collectives, so the other
        # ranks run the same stream alongside.
        weights = w.engine.weights(w.lm, list(w.lm.state_dict().keys()))
        if w.rank != 0:
            for _ in weights:
                pass
    else:
        # Gathered after the round's training, or now if this worker holds none (nothing trained
        # yet, or sent already): a collective, decided alike on every rank.
        state = trained.state if trained.held else w.engine.full_state_dict()
        trained.held, trained.state = False, None  # host memory back once sent (the folder's writer keeps its own reference)
        if w.rank == 0:
            # A PEFT model's adapters are merged into a copy: the folder's writer reads the state meanwhile.
            weights = hf_weights(w.lm, {k: v.clone() for k, v in state.items()} if _peft(w) else dict(state),
                                 prefix="lm.").items()
    if w.rank == 0:
        sender = WeightSender.open(job.receivers, w.engine.device, job.timeout_s)
        try:
            post_endpoint(sender.endpoint)
            stats = sender.send(weights, bucket_bytes=job.bucket_bytes)
            result = {"bytes": float(stats.bytes), "seconds": float(stats.seconds)}
        finally:
            sender.close()
    if dist.is_initialized():
        dist.barrier()
    return result
