"""The Ray Train worker function: shard iterator, engine, schedule, checkpoints, metrics.

It is the single-process training loop plus a few marked lines (``# ray:``), so one worker runs
it the same as many. Determinism: each epoch's rows come from a permutation of the whole training
set seeded by (seed, epoch) (see :mod:`raydpo.train.shuffle`), and a checkpoint records the step,
so resuming starts at exactly the batch after the last one trained on and reproduces the
uninterrupted loss curve.

Faults (docs/reliability.md): each rank appends the rows it trains on, step by step, to
``{output_dir}/trained_rows/rank{r}.jsonl`` (cut back to the checkpoint on a resume, so the file is
what the current weights were trained on). Before each step rank 0 asks the driver's stop signal
(``actors.preemption``, found by name) whether to stop; on a SIGTERM of the driver every rank stops
there, checkpoints and returns without the final folder. A checkpoint that cannot be written
(a full disk, a folder that cannot be made) fails with :class:`CheckpointWriteError`, naming the
folder, the cause and the previous checkpoint, which is left as it was. Every checkpoint ends with
a manifest of its files' sizes and hashes (:mod:`raydpo.train.checkpoints`), which the driver checks
before a resume; a load that fails on damaged bytes anyway raises ``DamagedCheckpoint``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydpo.config import LossConfig, TrainConfig
from raydpo.logprobs import PolicyScorer
from raydpo.metrics import all_reduce_sum
from raydpo.models import load_model, load_tokenizer
from raydpo.train import checkpoints
from raydpo.precision import allow_tf32
from raydpo.train.adapters import ModelPrep, prepare_model, save_streamed
from raydpo.train.adapters import save_final as save_final_folder
from raydpo.train.engine import OptimConfig, build_engine, deepspeed_config, deepspeed_ready
from raydpo.train.shuffle import ShuffledShard, epoch_order, worker_positions
from raydpo.train.step import LossSpec, RunningMean, evaluate, train_step
from raydpo.train.zero3 import load_partitioned
from raydpo.tracking import Tracker, TrackerSpec


@dataclass
class LoopArgs:
    """What the driver hands every worker: the ``train:`` and ``loss:`` settings whole, and what it
    derived from the model and the data."""

    train: TrainConfig
    loss: LossConfig
    model_path: str
    output_dir: str  # absolute; {output_dir}/final gets the HF folder
    local_batch_size: int  # pairs per worker per optimizer step (train.batch_size / workers)
    total_steps: int  # of this training (train.max_steps, else epochs x steps_per_epoch)
    steps_per_epoch: int
    # The materialized training set: refs to its Arrow blocks in order, and its row count. The
    # driver keeps the dataset alive while training runs.
    train_blocks: list[Any]
    train_rows: int
    dtype: str = "float32"
    gguf_file: str | None = None
    tracker: TrackerSpec | None = None  # rank 0 logs metrics and plots into the driver's run
    step_offset: int = 0  # logged step = step_offset + step (an online round continues the run's axis)
    has_eval: bool = True
    round: int = 0  # an online round's number (its checkpoints say which round they are of); 0 offline


class FixedShards(ray.train.DataConfig):
    """Gives each worker the same eval rows on every run: ``split`` of a materialized dataset in
    its (preserved) order, where the default streaming split hands blocks to whichever worker asks
    first. (Training rows do not come through here: see :class:`ShuffledShard`.)

    The split runs in the driver, when this is built, not in ``configure``: Ray Data's split runs a
    task of 1 CPU per block it cuts, and once the workers hold their CPUs (2 workers of 1 CPU on a
    2-CPU node) such a task would wait forever, and the workers with it."""

    def __init__(self, datasets: dict[str, ray.data.Dataset], world_size: int) -> None:
        super().__init__()
        # Equal shards: every worker runs the same number of forwards, which ZeRO-3 needs
        # (its forward gathers parameters collectively). Eval loses < world_size rows.
        self.parts = {name: ds.split(world_size, equal=True) for name, ds in datasets.items()}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name in datasets:
            for i, shard in enumerate(self.parts[name]):
                # Workers print one line per step; a bar per worker per pass is noise.
                shard.context.enable_progress_bars = False
                out[i][name] = shard.iterator()
        return out


def _say(message: str) -> None:
    """One progress line. Ray Train patches ``print`` to tee into its logger whenever another
    library has wrapped ``sys.stdout``, which printed every line twice; the raw stream does not."""
    print(message, file=sys.__stdout__, flush=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _micro(batch: dict[str, np.ndarray], size: int):
    n = len(batch["prompt_ids"])
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on GPU draws from these
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a folder that cannot be made or written)."""


def _write_failure(step: int, where: str, error: BaseException, previous: int,
                   local: Path | None = None) -> CheckpointWriteError:
    """The error a user can act on: the step, where it was written, the cause (with the free space
    of a ``local`` folder's filesystem: torch's writer reports a full disk as a bare RuntimeError),
    and the checkpoint a re-run resumes from."""
    cause = f"{type(error).__name__}: {error}"
    existing = next((p for p in (local, *local.parents) if p.is_dir()), None) if local else None
    if existing is not None:
        cause += f" ({shutil.disk_usage(existing).free / 2**20:.1f} MiB free on the filesystem of {existing})"
    kept = (f"the previous checkpoint (step {previous}) is intact; free space or fix the folder, then "
            "re-run the same command to resume from it") if previous else "no earlier checkpoint exists"
    return CheckpointWriteError(f"the checkpoint of step {step} could not be written to {where}: {cause}; {kept}")


def _save_checkpoint(engine, args: LoopArgs, step: int, metrics: dict[str, float], bco: RunningMean,
                     previous: int) -> None:
    """Collective: engine state + loop position + RNG, reported to Ray Train by every rank.
    ``previous``: the step of the latest checkpoint (0: none), named if this one fails.

    Every rank writes its own files into a staging folder of its own (on a multi-node cluster
    ``output_dir`` may be node-local) and reports it; Ray Train merges the ranks' files into one
    checkpoint in storage, in a new folder, each rank uploading only its own files (with one
    shared folder, every rank would upload all of them): a failure on the way leaves the previous
    checkpoint as it was."""
    staging = Path(args.output_dir) / ".staging" / f"step_{step:08d}" / f"rank{_rank()}"
    try:
        staging.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        engine.save(str(staging))  # DDP: rank 0 writes it all; ZeRO: each rank its partitions
        torch.save(_rng_state(), staging / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            # "manifest": this checkpoint has one, so one found without it is damaged, not an older raydpo's.
            state = {"step": step, "round": args.round, "bco": asdict(bco), "manifest": checkpoints.MANIFEST}
            (staging / "loop_state.json").write_text(json.dumps(state))
        _write_manifest(staging, step)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's file writer
        raise _write_failure(step, str(staging), e, previous, local=staging) from e
    if dist.is_initialized():
        dist.barrier()  # the manifest is written before any rank hands the folder over
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)))  # ray: uploads
    except OSError as e:
        raise _write_failure(step, f"Ray Train's storage (from {staging})", e, previous) from e
    shutil.rmtree(staging, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # every rank's folder is gone before rank 0 removes the step's
    if _rank() == 0:
        shutil.rmtree(staging.parent, ignore_errors=True)


def _write_manifest(staging: Path, step: int) -> None:
    """Collective, once every rank's files are in its ``staging`` folder: each rank hashes its own
    files (the cost, about 1 s/GB, spread over the ranks as the files are), and rank 0 writes the
    manifest of them all, the checkpoint's last file (:mod:`raydpo.train.checkpoints`)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.barrier()  # every rank's files are written
    share = checkpoints.describe(staging, checkpoints.local_files(staging))
    shares: list[dict[str, Any]] = [share]
    if world > 1:
        shares = [{} for _ in range(world)]
        dist.all_gather_object(shares, share)
    if _rank() == 0:
        checkpoints.write_manifest(staging, step, {k: v for s in shares for k, v in s.items()})


def stop_signal_name(output_dir: str, job_id: str) -> str:
    """The Ray actor name of the driver's stop signal (``actors.preemption.StopSignal``) for the
    training that writes ``output_dir`` in job ``job_id`` (the driver's and its workers')."""
    return f"raydpo-stop-{job_id}-{hashlib.sha256(output_dir.encode()).hexdigest()[:16]}"


class StopCheck:
    """Whether the driver asked the workers to stop (a SIGTERM: spot preemption, ``ray job stop``).

    Rank 0 asks the driver's ``StopSignal`` actor, found by name (none: a driver without one, never
    a stop); every rank takes rank 0's answer, so all stop at the same step boundary. By a Ray
    actor, not a file: on a cluster ``output_dir`` may be a folder of the driver's node only."""

    def __init__(self, output_dir: str, rank: int) -> None:
        self.actor = None
        if rank == 0:
            try:
                self.actor = ray.get_actor(stop_signal_name(output_dir, ray.get_runtime_context().get_job_id()))
            except ValueError:  # no such actor
                pass

    def requested(self, device: torch.device) -> bool:
        """COLLECTIVE (every rank, every step): one small all-reduce, and rank 0's call to the actor."""
        flag = 0.0
        if self.actor is not None:
            try:
                flag = float(ray.get(self.actor.requested.remote()))
            except ray.exceptions.RayActorError:  # the driver is gone; so will its workers be
                self.actor = None
        return bool(all_reduce_sum(torch.tensor([flag], dtype=torch.float64, device=device)).item() > 0)

    def stopped(self, step: int) -> None:
        """Rank 0: tell the driver the step whose checkpoint the next run resumes from."""
        if self.actor is not None:
            ray.get(self.actor.stopped.remote(step))


def _step_of(line: str) -> int | None:
    """The step of a trained-rows line, or None where it is not one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


class TrainedRows:
    """``{output_dir}/trained_rows/rank{r}.jsonl``: one line per step this rank trained, ``step``,
    ``epoch``, ``rows`` (positions in the materialized training set), ``digest`` (a hash of the
    batch's token ids: what was trained, not only where it came from), ``pid`` and ``time`` (Unix
    seconds). A resume cuts it back to the checkpoint's step: the file holds what the current
    weights were trained on.

    It is a record, not state the training reads: a line that is not one (the last line of a
    worker killed mid-write, damaged bytes) is dropped on the cut-back, and rank 0 says how many."""

    def __init__(self, output_dir: str, rank: int, start_step: int) -> None:
        self.path = Path(output_dir) / "trained_rows" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        kept = [line for line in lines if (s := _step_of(line)) is not None and s <= start_step]
        damaged = sum(1 for line in lines if line and _step_of(line) is None)
        if damaged and rank == 0:
            _say(f"[raydpo] {self.path}: {damaged} damaged line(s) dropped (a record only; training is unaffected)")
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")

    def write(self, step: int, epoch: int, rows: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        h = hashlib.blake2b(digest_size=16)
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for ids in batch[name]:
                ids = np.asarray(ids, dtype="<i4")
                h.update(len(ids).to_bytes(4, "little"))
                h.update(ids.tobytes())
        line = {"step": step, "epoch": epoch, "rows": [int(r) for r in rows], "digest": h.hexdigest(),
                "pid": os.getpid(), "time": round(time.time(), 3)}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()  # a killed worker leaves every step it finished

    def close(self) -> None:
        self.file.close()


def _restore(engine, bco: RunningMean) -> int:
    """Load the latest checkpoint, if Ray Train has one (a restart or a re-run); returns its step."""
    checkpoint = ray.train.get_checkpoint()  # ray
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return load_checkpoint(engine, bco, Path(d), checkpoint.path)


def load_checkpoint(engine, bco: RunningMean, folder: Path, name: str) -> int:
    """COLLECTIVE: load checkpoint ``folder`` (``name``: where it is stored, for messages) into
    ``engine``, ``bco`` and this rank's RNGs; returns its step.

    The driver verified it against its manifest before Ray Train started
    (:func:`raydpo.train.checkpoints.repair_run`); a load that still fails on the checkpoint's
    bytes (one written before manifests, or damaged since) raises
    :class:`~raydpo.train.checkpoints.DamagedCheckpoint`, naming the checkpoint and the file, and
    the driver resumes from the one before. Every file is needed: a rank without its RNG file
    would draw other dropout masks than the uninterrupted run."""
    what = "the engine's state (engine_state.pt, or DeepSpeed's latest and global_step folder)"
    try:
        engine.load(str(folder))
        what = "loop_state.json"
        state = json.loads((folder / what).read_text())
        step = int(state["step"])
        bco.mean, bco.count = state["bco"]["mean"], state["bco"]["count"]
        what = f"rng_rank{_rank()}.pt"
        _set_rng_state(torch.load(folder / what, weights_only=False))
    except Exception as e:
        if checkpoints.is_read_failure(e) or (what == "loop_state.json" and isinstance(e, (KeyError, TypeError, ValueError))):
            why = f"{what} could not be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            raise checkpoints.DamagedCheckpoint(name, why) from e
        raise
    return step


@dataclass
class Worker:
    """What a training worker loads once: the tokenizer, the policy behind its scorer, the engine
    (model, optimizer, process group), and the loss. An online run keeps it across rounds."""

    rank: int
    world: int
    tokenizer: Any
    pad_id: int
    lm: torch.nn.Module
    engine: Any
    spec: LossSpec
    layout: dict[str, Any]  # packed rows (of at most max_tokens tokens) or one padded batch


def set_up(args: LoopArgs, device: torch.device) -> Worker:
    """Load the tokenizer and the policy at ``args.model_path`` and build the engine for
    ``args.total_steps`` steps (a later training on the same worker restarts its optimizer) on
    ``device`` (a Ray Train worker's: ``ray.train.torch.get_device()``).

    Under ZeRO-3 the policy is loaded straight into its partitions (:mod:`raydpo.train.zero3`):
    no worker ever holds the whole model; the DeepSpeed config is built once, for that load and
    for the engine."""
    # One line per log step is the progress; per-iteration Ray Data bars from every worker are noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train = args.train
    torch.manual_seed(train.seed)
    allow_tf32(device)  # float32 matmuls on TF32 tensor cores (CUDA only)
    grad_accum = args.local_batch_size // train.micro_batch_size
    ds_config = deepspeed_config(
        micro_batch_size=train.micro_batch_size, grad_accum_steps=grad_accum, zero_stage=train.zero_stage,
        bf16=train.bf16, max_grad_norm=train.max_grad_norm, offload_optimizer=train.offload_optimizer,
    ) if train.engine == "deepspeed" else None
    zero3 = ds_config is not None and train.zero_stage == 3
    tokenizer = load_tokenizer(args.model_path, args.gguf_file)
    if zero3:
        if args.gguf_file:
            raise ValueError("a GGUF file is loaded de-quantized whole; under ZeRO-3 load the plain folder "
                             "raydpo.models.write_plain makes of it")
        deepspeed_ready(device)  # the process group the partitioned load's collectives use
        model = load_partitioned(args.model_path, args.dtype, ds_config)
    else:
        model = load_model(args.model_path, args.dtype, args.gguf_file)
    lm = prepare_model(model, ModelPrep.from_train(train))
    scorer = PolicyScorer(lm, train.logprob_chunk_tokens)
    engine = build_engine(
        train.engine, scorer, OptimConfig.from_train(train, args.total_steps),
        grad_accum_steps=grad_accum, micro_batch_size=train.micro_batch_size,
        zero_stage=train.zero_stage, bf16=train.bf16, offload_optimizer=train.offload_optimizer,
        device=device, ds_config=ds_config,
    )
    if zero3:
        scorer.register_zero3()  # the chunked head reads the partitioned head weight directly
    # Packed: each micro-batch's 2 x micro_batch_size sequences in rows of at most max_tokens tokens
    # (positions restart per sequence, no attention across them); else one padded batch.
    layout = {"packed": train.packing, "max_tokens": train.max_tokens_per_batch}
    return Worker(_rank(), dist.get_world_size() if dist.is_initialized() else 1, tokenizer, tokenizer.pad_token_id,
                  lm, engine, LossSpec.from_config(args.loss), layout)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The offline training: set up, resume from Ray Train's latest checkpoint, train, save the
    final HF folder."""
    args: LoopArgs = config["args"]
    w = set_up(args, ray.train.torch.get_device())  # ray: this worker's GPU, or the CPU
    bco = RunningMean()
    start_step = _restore(w.engine, bco)
    if w.rank == 0 and start_step:
        _say(f"[raydpo] resumed at step {start_step}/{args.total_steps}")
    eval_shard = ray.train.get_dataset_shard("eval") if args.has_eval else None  # ray
    if not train_steps(w, args, bco, start_step, eval_shard).stopped:
        save_final(w, args)


@dataclass(frozen=True)
class Steps:
    """What :func:`train_steps` did: ``stopped`` when the driver asked the workers to stop (a
    SIGTERM: the last step is then checkpointed and nothing more); the last step trained and its
    metrics (empty if none)."""

    stopped: bool
    step: int
    metrics: dict[str, float]


def train_steps(w: Worker, args: LoopArgs, bco: RunningMean, start_step: int, eval_shard=None) -> Steps:
    """COLLECTIVE: steps ``start_step + 1 .. args.total_steps`` on ``args``' training rows, with
    the metrics, evaluations and checkpoints ``args.train`` asks for."""
    train, rank, world, engine = args.train, w.rank, w.world, w.engine
    # Rank 0 logs: writes go to the spool on disk and a thread delivers them, so a slow or
    # stopped tracking server never stalls the step.
    tracker = Tracker.open(args.tracker, "rank0", say=_say) if rank == 0 and args.tracker else None
    train_shard = ShuffledShard(args.train_blocks, args.train_rows, train.seed, rank, world,
                                args.local_batch_size, args.steps_per_epoch)  # its part of each epoch
    trained_rows = TrainedRows(args.output_dir, rank, start_step)
    stop = StopCheck(args.output_dir, rank)
    step, saved, stopping, metrics = start_step, start_step, False, {}
    engine.module.train()
    t_last, pairs_last = time.perf_counter(), 0
    for epoch in range(start_step // args.steps_per_epoch, 10**9):
        if step >= args.total_steps or stopping:
            break
        skip = step - epoch * args.steps_per_epoch  # batches of this epoch already trained on
        positions = worker_positions(epoch_order(args.train_rows, train.seed, epoch), rank, world,
                                     args.local_batch_size, args.steps_per_epoch)  # what ShuffledShard reads
        for i, batch in train_shard.batches(epoch, start=skip):
            if step >= args.total_steps:
                break
            if stop.requested(engine.device):  # at a step boundary, the same one on every rank
                stopping = True
                break
            metrics = train_step(engine, _micro(batch, train.micro_batch_size), w.spec, w.pad_id, bco, **w.layout)
            step += 1
            trained_rows.write(step, epoch, positions[i], batch)
            metrics["epoch"] = epoch + (i + 1) / args.steps_per_epoch
            pairs_last += args.local_batch_size * world
            last = step == args.total_steps
            if step % train.log_every == 0 or last:
                now = time.perf_counter()
                metrics["pairs_per_s"] = pairs_last / max(now - t_last, 1e-9)
                t_last, pairs_last = now, 0
                if tracker:
                    tracker.log_metrics(metrics, args.step_offset + step)
            if eval_shard is not None and ((train.eval_every and step % train.eval_every == 0) or last):
                eval_batches = eval_shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy")
                margins: list[float] = []  # every eval pair's reward margin, for the histogram
                eval_metrics = evaluate(engine, eval_batches, w.spec, w.pad_id, margins=margins, **w.layout)
                metrics |= eval_metrics
                if tracker:
                    tracker.log_metrics(eval_metrics, args.step_offset + step)
                    tracker.log_plots(args.step_offset + step, margins)
            # An online round (args.round) checkpoints only where train.checkpoint_every says: its
            # end is its policy's HF folder, and the next round starts a fresh optimizer.
            if (train.checkpoint_every and step % train.checkpoint_every == 0) or (last and not args.round):
                _save_checkpoint(engine, args, step, {**metrics, "step": step}, bco, saved)
                saved = step
            if train.fail_at_step == step:
                _inject_failure(args, step)
    trained_rows.close()
    if stopping:
        if saved != step:
            _save_checkpoint(engine, args, step, {"step": step}, bco, saved)
        stop.stopped(step)
        if rank == 0:
            _say(f"[raydpo] stopped at step {step}/{args.total_steps} as asked; checkpointed")
    if tracker:
        if eval_shard is None and not stopping:
            tracker.log_plots(args.step_offset + step)
        tracker.close(timeout=10)  # what is left, the driver delivers (or the next run)
    return Steps(stopping, step, {k: float(v) for k, v in metrics.items()})


def _inject_failure(args: LoopArgs, step: int) -> None:
    """Raise on every rank, the first time this output_dir reaches ``step``."""
    marker = Path(args.output_dir) / f".failure_injected_at_{step}"
    if marker.exists():
        return
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the marker before rank 0 writes it
    if _rank() == 0:
        marker.touch()
    raise RuntimeError(f"injected failure after step {step} (train.fail_at_step)")


def save_final(w: Worker, args: LoopArgs) -> None:
    """COLLECTIVE: the policy as a plain HF folder, ``{output_dir}/final``, that from_pretrained
    loads (LoRA merged in, the adapter also in ``final/adapter``). A plain model is streamed out
    one tensor at a time (ZeRO-3: gathered one at a time), never whole in any process's memory; a
    PEFT model is gathered whole on rank 0 to be merged."""
    out = Path(args.output_dir) / "final"
    if hasattr(w.lm, "peft_config"):
        state = w.engine.full_state_dict()  # gathers ZeRO-3 shards; keys carry the scorer's "lm."
        if w.rank == 0:
            save_final_folder(w.lm, state, w.tokenizer, out, prefix="lm.")
    else:
        save_streamed(w.lm, w.engine, w.tokenizer, out)
    if dist.is_initialized():
        dist.barrier()
