"""``train_policy``: one DPO training of a policy on tokenized pairs, on Ray Train.

The offline job calls it once; an online round calls it once per round, each with its own output
folder and a step offset, so the rounds' metrics continue one step axis in the same MLflow run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydpo.config import LossConfig, TrainConfig
from raydpo.data.pipeline import DataError
from raydpo.progress import TrainProgress, say
from raydpo.spool import Spool
from raydpo.tracking import TrackerSpec
from raydpo.train.adapters import LoraSettings, ModelPrep
from raydpo.train.loop import FixedShards, LoopArgs, train_loop_per_worker


@dataclass(frozen=True)
class PolicyResult:
    final_dir: Path  # a plain HF folder (from_pretrained loads it)
    metrics: dict[str, float]  # the last step's metrics (and the last eval's)
    last_step: int  # step_offset + the optimizer steps trained


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
    same ``out_dir`` resumes). Metrics go to ``tracker``'s run at steps ``step_offset + 1 ...``;
    progress to the console."""
    n_train, n_eval = train_ds.count(), eval_ds.count() if eval_ds is not None else 0
    local_batch = train.batch_size // train.num_workers
    steps_per_epoch = (n_train // train.num_workers) // local_batch
    if steps_per_epoch == 0:
        raise DataError(f"{n_train} training pairs is less than one batch (train.batch_size {train.batch_size})")
    total = min(train.max_steps or 10**12, steps_per_epoch * train.epochs)
    args = LoopArgs(
        model_path=model_path, output_dir=str(out_dir), engine=train.engine, zero_stage=train.zero_stage,
        local_batch_size=local_batch, micro_batch_size=train.micro_batch_size, total_steps=total,
        steps_per_epoch=steps_per_epoch, lr=train.lr, weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps, schedule=train.schedule, max_grad_norm=train.max_grad_norm,
        bf16=train.bf16, seed=train.seed,
        train_blocks=train_ds.to_arrow_refs(), train_rows=n_train,  # each epoch permutes all rows
        log_every=train.log_every, eval_every=train.eval_every, checkpoint_every=train.checkpoint_every,
        fail_at_step=train.fail_at_step, loss_weights=loss.weight_map(), loss_params=loss.params(),
        reference_free=not loss.needs_reference(), dtype=dtype, gguf_file=None,
        tracker=tracker, step_offset=step_offset, has_eval=n_eval > 0,
        prep=ModelPrep(gradient_checkpointing=train.gradient_checkpointing,
                       lora=LoraSettings(**train.lora.model_dump()) if train.lora else None),
        offload_optimizer=train.offload_optimizer, packing=train.packing,
        max_tokens_per_batch=train.max_tokens_per_batch, chunk_tokens=train.logprob_chunk_tokens,
    )
    say(f"[raydpo] training: {n_train} pairs ({n_eval} held out), {train.num_workers} worker(s), "
        f"{total} steps of {train.batch_size} pairs")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(
            name="train",
            storage_path=str(out_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"eval": eval_ds} if n_eval else {},  # train rows: LoopArgs.train_blocks
        dataset_config=FixedShards(),
    )
    # One line per logged step, read from rank 0's tracking spool (the workers' output stays in Ray's logs).
    progress = TrainProgress(Spool(tracker.spool_dir, "rank0"), step_offset + total).start() if tracker else None
    try:
        result = trainer.fit()
    finally:
        if progress:
            progress.stop()
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return PolicyResult(out_dir / "final", metrics, step_offset + total)
