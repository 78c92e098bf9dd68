"""``train_policy``: one DPO training of a policy on tokenized pairs, on Ray Train.

The offline job calls it once; an online round calls it once per round, each with its own output
folder and a step offset, so the rounds' metrics continue one step axis in the same MLflow run.
"""
from __future__ import annotations

import hashlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import ray.data
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydpo.config import LossConfig, TrainConfig
from raydpo.data.pipeline import DataError
from raydpo.errors import input_error
from raydpo.progress import TrainProgress, say
from raydpo.spool import Spool
from raydpo.tracking import TrackerSpec
from raydpo.train.checkpoints import DamagedCheckpoint, repair_run
from raydpo.train.loop import FixedShards, LoopArgs, train_loop_per_worker


@dataclass(frozen=True)
class PolicyResult:
    final_dir: Path  # a plain HF folder (from_pretrained loads it)
    metrics: dict[str, float]  # the last step's metrics (and the last eval's)
    last_step: int  # step_offset + the optimizer steps trained


def checkpoint_location(storage_path: str | None, out_dir: Path) -> tuple[str, str]:
    """``(RunConfig.storage_path, RunConfig.name)`` of the training that writes ``out_dir``:
    ``{out_dir}/ray`` and ``train`` by default (``train.storage_path`` unset). Under a storage
    path, a folder named after ``out_dir`` and a hash of its absolute path, so every output folder
    and every online round (each its own ``out_dir``) keeps its own checkpoints there, and the same
    ``output_dir`` finds them again on a re-run."""
    if storage_path is None:
        return str(out_dir / "ray"), "train"
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:12]
    if "://" not in storage_path:  # a local or NFS folder: absolute, as Ray Train wants it
        storage_path = str(Path(storage_path).expanduser().resolve())
    return storage_path.rstrip("/"), f"{out_dir.name}-{digest}"


def worker_env(train: TrainConfig) -> dict[str, str]:
    """The training workers' environment variables. Ray starts each worker process with them, so
    glibc reads its malloc settings before the first allocation. The mmap threshold is a CPU
    setting (the step's activations live in host memory there); GPU workers (``train.use_gpu``)
    keep glibc's own behaviour: their activations are on the device, and a low threshold would
    only slow the host's allocations (pinned batches, the data pipeline)."""
    env = {}
    if train.malloc_mmap_threshold is not None and not train.use_gpu:
        env["MALLOC_MMAP_THRESHOLD_"] = str(train.malloc_mmap_threshold)
    return env | (train.env or {})


class WorkersLost(RuntimeError):
    """Training workers died (their process killed, or their node lost) with no restart left
    (``train.max_failures``); the message says which, and what a re-run resumes from."""


# What torch.distributed raises at a rank whose peer died mid-collective: gloo's TCP transport, and
# NCCL. With the peer's node gone, this often reaches Ray Train before the dead worker's own failure.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer",
             "remote process exited or there was a network error", "NCCL communicator was aborted")


def lost_workers(error: BaseException) -> dict[int, str]:
    """rank -> what was seen, for each training worker of Ray Train's ``WorkerGroupError``
    ``error`` whose process died (Ray's account), or whose collective failed because a peer's
    connection dropped (that rank survived; its peer is the one lost); empty for any other
    failure (an exception in the loop)."""
    from ray.exceptions import RayActorError

    lost = {}
    for rank, failure in getattr(error, "worker_failures", {}).items():
        failure = getattr(failure, "health_check_failure", failure)  # Ray Train 2.60 wraps a dead worker's error
        if isinstance(failure, RayActorError):
            lost[rank] = str(failure)
            continue
        dropped = [line.strip() for line in str(failure).splitlines() if any(m in line for m in PEER_LOST)]
        if dropped:
            lost[rank] = f"its connection to a peer dropped: {dropped[-1]}"
    return lost


def workers_lost(lost: dict[int, str], storage_path: str, name: str) -> WorkersLost:
    """The error a user can act on: which ranks, Ray's account (a node that went down shows
    first as its workers' connections refused: Ray cannot tell a crashed node from a killed
    process at that moment), and what the same command resumes from."""
    ranks = ", ".join(map(str, sorted(lost)))
    why = " ".join(next(iter(lost.values())).split())  # Ray's account, on one line
    resume = (f"re-run the same command to resume from the latest checkpoint in {storage_path}/{name}"
              if has_checkpoints(storage_path, name) else "no checkpoint was written yet: a re-run starts over")
    return WorkersLost(f"training stopped: a training worker was lost, its process or its node (rank {ranks}: "
                       f"{why}); {resume}, once the cluster has the nodes again. train.max_failures > 0 lets the "
                       "job restart its workers itself, waiting for the nodes")


def damaged_checkpoint(error: BaseException) -> DamagedCheckpoint | None:
    """The :class:`DamagedCheckpoint` a worker of Ray Train's ``WorkerGroupError`` ``error`` raised
    where its load failed on the checkpoint's bytes, if that is what failed."""
    for failure in getattr(error, "worker_failures", {}).values():
        found = input_error(getattr(failure, "_base_exc", failure))  # Ray Train 2.60 keeps the worker's exception there
        if isinstance(found, DamagedCheckpoint):
            return found
    return None


def has_checkpoints(storage_path: str, name: str) -> bool:
    """Whether Ray Train's folder ``{storage_path}/{name}`` (any pyarrow filesystem) holds a checkpoint."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    found = fs.get_file_info(pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{name}", allow_not_found=True))
    # A folder: Ray Train's snapshot file (checkpoint_manager_snapshot.json) is not a checkpoint.
    return any(f.base_name.startswith("checkpoint_") and f.type == pyarrow.fs.FileType.Directory for f in found)


def schedule(n_train: int, train: TrainConfig) -> tuple[int, int, int]:
    """``(pairs per worker per step, steps per epoch, total steps)`` of a training on ``n_train``
    pairs; :class:`DataError` when they are less than one global batch."""
    local_batch = train.batch_size // train.num_workers
    steps_per_epoch = (n_train // train.num_workers) // local_batch
    if steps_per_epoch == 0:
        raise DataError(f"{n_train} training pairs is less than one batch (train.batch_size {train.batch_size})")
    return local_batch, steps_per_epoch, min(train.max_steps or 10**12, steps_per_epoch * train.epochs)


def train_policy(
    train_ds: ray.data.Dataset,
    eval_ds: ray.data.Dataset | None,
    *,
    model_path: str,
    out_dir: Path,
    train: TrainConfig,
    loss: LossConfig,
    dtype: str,
    tracker: TrackerSpec | None,
    step_offset: int = 0,
) -> PolicyResult:
    """Train the policy at ``model_path`` on ``train_ds`` (tokenized pairs, with reference
    columns unless ``loss`` is reference-free), evaluated on ``eval_ds`` where given.
    ``{out_dir}/final`` gets the result and ``{out_dir}/ray`` the checkpoints (a second call on the
    same ``out_dir`` resumes from the newest intact checkpoint: a damaged one is moved aside, saying
    why, and so is one a worker fails to load, the training then started again; see
    :mod:`raydpo.train.checkpoints`). Metrics go to ``tracker``'s run at steps ``step_offset + 1 ...``;
    progress to the console."""
    n_train, n_eval = train_ds.count(), eval_ds.count() if eval_ds is not None else 0
    local_batch, steps_per_epoch, total = schedule(n_train, train)
    args = LoopArgs(
        train=train, loss=loss, model_path=model_path, output_dir=str(out_dir), local_batch_size=local_batch,
        total_steps=total, steps_per_epoch=steps_per_epoch,
        train_blocks=train_ds.to_arrow_refs(), train_rows=n_train,  # each epoch permutes all rows
        dtype=dtype, tracker=tracker, step_offset=step_offset, has_eval=n_eval > 0,
    )
    storage_path, name = checkpoint_location(train.storage_path, out_dir)
    say(f"[raydpo] training: {n_train} pairs ({n_eval} held out), {train.num_workers} worker(s), "
        f"{total} steps of {train.batch_size} pairs"
        + (f"; checkpoints in {storage_path}/{name}" if train.storage_path else ""))

    loop_config = {"args": args}
    # One line per logged step, read from rank 0's tracking spool (the workers' output stays in Ray's logs).
    progress = TrainProgress(Spool(tracker.spool_dir, "rank0"), step_offset + total).start() if tracker else None
    # fit() installs a SIGINT handler bound to this run's controller and leaves it behind; after the
    # fit, Ctrl-C (in a later round's generation, or while `raydpo submit` follows a job) must reach
    # the caller's handler again, not abort a controller that is gone.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = fit(train_loop_per_worker, loop_config, train, storage_path, name,
                     datasets={"eval": eval_ds} if n_eval else {})  # train rows: LoopArgs.train_blocks
    finally:
        if progress:
            progress.stop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return PolicyResult(out_dir / "final", metrics, step_offset + total)


def fit(loop, loop_config: dict[str, Any], train: TrainConfig, storage_path: str, name: str,
        datasets: dict[str, ray.data.Dataset] | None = None) -> ray.train.Result:
    """Ray Train's ``fit()`` of ``loop`` on ``train.num_workers`` workers, resuming from the newest
    intact checkpoint in ``{storage_path}/{name}``: a damaged one is moved aside before the
    workers start, saying why, and so is one a worker fails to load (the fit then starts again).
    Lost workers with no restart left raise :class:`WorkersLost`."""
    shards = FixedShards(datasets or {}, train.num_workers)  # split before the workers hold the CPUs

    def trainer() -> TorchTrainer:
        return TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker, **(train.resources or {})},
                                         placement_strategy=train.placement_strategy,
                                         accelerator_type=train.accelerator_type),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,  # a local folder or a pyarrow URI (s3://, gs://)
                checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
                failure_config=FailureConfig(max_failures=train.max_failures),
                worker_runtime_env={"env_vars": worker_env(train)},
            ),
            datasets=datasets or {},
            dataset_config=shards,
        )

    damaged: dict[str, str] = {}  # checkpoint folder name -> why a worker could not load it
    while True:
        # Before any worker starts: Ray Train resumes from the newest intact checkpoint.
        repair_run(storage_path, name, say, damaged)
        try:
            return trainer().fit()
        except ray.train.WorkerGroupError as e:
            failed = damaged_checkpoint(e)
            if failed is not None and PurePosixPath(failed.folder).name not in damaged:
                damaged[PurePosixPath(failed.folder).name] = failed.why  # moved aside by the next repair_run
                continue
            lost = lost_workers(e)
            if lost:
                raise workers_lost(lost, storage_path, name) from e
            raise
