"""Offline DPO: read -> tokenize -> reference log-probs (own actor pool) -> Ray Train -> HF folder.

``python -m jobs.train_dpo CONFIG [--set key=value ...]`` (or ``raydpo train``); this is also what
``ray job submit`` runs. The whole config is seen only here; everything below takes plain values.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydpo import tracking
from raydpo.config import Config, ConfigError, flatten, load_config_or_report, trajectory_changes
from raydpo.progress import TrainProgress, quiet_libraries
from raydpo.spool import Spool
from raydpo.tracking import Tracker


@dataclass
class Outcome:
    run_id: str
    final_dir: str
    metrics: dict[str, float]
    report: dict[str, Any]
    seconds: float


def setup(cfg: Config) -> tuple[Path, str, list[str]]:
    """Absolute output dir, the model path every actor loads, and the train sources. The tiny
    model is built, and a GGUF model de-quantized, once into ``{output_dir}/initial``."""
    from raydpo.data.sources import mixture_weights
    from raydpo.data.synthetic import write_shards
    from raydpo.models import TINY, write_plain, write_tiny

    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = cfg.model.name_or_path
    if model_path == TINY:
        t = cfg.model.tiny
        model_path = str(write_tiny(out / "initial", hidden_size=t.hidden_size, num_layers=t.num_layers,
                                    num_heads=t.num_heads, max_positions=t.max_positions, seed=t.seed))
    elif cfg.model.gguf_file:
        model_path = str(write_plain(model_path, cfg.model.gguf_file, out / "initial", cfg.model.dtype))
    sources = list(cfg.data.train)
    mixture_weights(sources)  # a source in two weighted entries fails here, before Ray starts
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        sources += write_shards(out / "data", task=s.task, rows=s.rows, seed=s.seed)
    return out, model_path, sources


def tokenize(cfg: Config, model_path: str, sources: list[str]):
    """Every row of the config's sources, normalised and tokenized (dropped rows too, with their
    reasons), materialized. ``train`` and ``precompute`` share it, so they see the same pairs."""
    from raydpo.data.pipeline import tokenized_dataset

    d = cfg.data
    settings = d.tokenize_settings()
    tokenized = tokenized_dataset(sources, d.eval, model_path=model_path, gguf_file=None,
                                  settings=settings, eval_fraction=d.eval_fraction, seed=d.seed,
                                  limit=d.limit, columns=d.columns, fmt=d.format, chat_template=d.chat_template,
                                  ranked_pairs=d.ranked_pairs, min_score_margin=d.min_score_margin).materialize()
    return tokenized


def run(cfg: Config, config_path: str | None = None, verbose: bool = False) -> Outcome:
    """The whole offline job; the MLflow run is marked FAILED if anything raises (a re-run of the
    same command resumes it)."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    check_resume(cfg, out)
    if not verbose:
        quiet_libraries()
    tracker, resumed = Tracker.start(cfg.tracking, out, cfg.tracking.run_name,
                                     tags={"raydpo.job": "train"})  # an unreachable server fails here
    print(f"[raydpo] MLflow run {tracker.run_id} ({'resumed' if resumed else 'new'}) at "
          f"{tracking.display_uri(tracker.spec.uri)}", flush=True)
    try:
        out, model_path, sources = setup(cfg)
        outcome = _run(cfg, config_path, tracker, out, model_path, sources, t0, verbose)
    except BaseException:
        tracker.finish("FAILED", timeout=cfg.tracking.flush_timeout_s)
        raise
    return outcome


RUN_CONFIG = "run_config.json"  # in output_dir: the flattened config that trained its checkpoints


def check_resume(cfg: Config, out: Path) -> None:
    """Before any work: an ``output_dir`` that holds checkpoints resumes only with a config that
    trains the same way; otherwise it would skip the wrong batches and restore another run's
    optimizer state. Harmless keys (``config.RESUME_HARMLESS``) may change."""
    saved = out / RUN_CONFIG
    if not saved.exists() or not any((out / "ray" / "train").glob("checkpoint_*")):
        return
    changes = trajectory_changes(json.loads(saved.read_text()), flatten(cfg))
    if changes:
        raise ConfigError(
            f"output_dir {out} holds checkpoints of a run with another config; resuming would train "
            "differently. Changed:\n  " + "\n  ".join(changes) + "\nRe-run with the original values to "
            f"resume, or start fresh with a new output_dir (or delete {out}).")


def _run(cfg: Config, config_path: str | None, tracker, out: Path, model_path: str, sources: list[str],
         t0: float, verbose: bool) -> Outcome:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.precompute import cache_for, reference_stage
    from jobs.precompute import log_stats as log_ref_stats
    from jobs.precompute import summary as ref_summary
    from raydpo.data.pipeline import TRAIN_COLUMNS, DataError, build_report, kept_rows, length_stats, mix_sources
    from raydpo.data.refcache import source_identity
    from raydpo.data.sources import mixture_weights
    from raydpo.losses import REFERENCE_FREE_LOSSES
    from raydpo.train.adapters import LoraSettings, ModelPrep
    from raydpo.train.loop import FixedShards, LoopArgs, train_loop_per_worker

    # Workers' output stays in Ray's log folder (the progress comes from rank 0's spool) unless --verbose.
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)  # local unless RAY_ADDRESS
    tracker.log_params(flatten(cfg) | tracking.versions())
    tracker.log_dict(cfg.model_dump(mode="json"), "config.yaml")
    if config_path:
        tracker.log_artifact(config_path)

    # Data: every row read is kept or counted by reason.
    d = cfg.data
    tokenized = tokenize(cfg, model_path, sources)
    report = build_report(tokenized)
    print(report.summary(), flush=True)
    report.lengths = length_stats(tokenized)  # token-length percentiles, logged with the report
    tracker.log_report(report.to_dict())
    fingerprints = {s: source_identity(s) for s in report.sources}
    for source, counts in report.sources.items():  # MLflow dataset inputs: source, digest, rows
        tracker.log_input(Path(source).name or source, source, fingerprints[source].split(":", 1)[1],
                          context="training", rows=counts["read"])
    tracker.log_params({"fingerprint/data": _combined(fingerprints)})
    if report.drop_fraction > d.max_drop_fraction:
        raise DataError(f"dropped {report.drop_fraction:.1%} of rows, over data.max_drop_fraction "
                        f"{d.max_drop_fraction:.1%}\n{report.summary()}")

    # Reference log-probs, once per pair, in actors of their own.
    kept = kept_rows(tokenized)
    mixture = mixture_weights(sources)  # (entry -> weight, source -> entry); None without weights
    if mixture is not None:
        kept, mix_counts = mix_sources(kept, mixture[0], d.seed, groups=mixture[1])
        print("[raydpo] mixture (train pairs used / available): " + ", ".join(
            f"{k} {c['used']}/{c['available']}" for k, c in mix_counts.items()), flush=True)
        tracker.log_mixture(mix_counts)
    weights = cfg.loss.weights or {cfg.loss.type: 1.0}
    reference_free = cfg.loss.reference_free or set(weights) <= REFERENCE_FREE_LOSSES
    if not reference_free:
        r = cfg.reference
        kept, ref_stats = reference_stage(
            kept, cache_for(cfg, model_path, None), model_path=model_path, gguf_file=None, dtype=r.dtype,
            num_actors=r.num_actors, num_cpus=r.num_cpus, num_gpus=r.num_gpus, batch_tokens=r.batch_tokens,
            window=r.window, max_padding=r.max_padding, fail_after_blocks=r.fail_after_blocks)
        print(ref_summary(ref_stats), flush=True)
        log_ref_stats(tracker, ref_stats)
    kept = kept.materialize()
    columns = TRAIN_COLUMNS if not reference_free else TRAIN_COLUMNS[:3]
    train_ds = kept_rows(kept, "train").select_columns(columns).materialize()
    eval_ds = kept_rows(kept, "eval").select_columns(columns).materialize()
    n_train, n_eval = train_ds.count(), eval_ds.count()

    # Policy update.
    t = cfg.train
    local_batch = t.batch_size // t.num_workers
    steps_per_epoch = (n_train // t.num_workers) // local_batch
    if steps_per_epoch == 0:
        raise DataError(f"{n_train} training pairs is less than one batch (train.batch_size {t.batch_size})")
    total = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    args = LoopArgs(
        model_path=model_path, output_dir=str(out), engine=t.engine, zero_stage=t.zero_stage,
        local_batch_size=local_batch, micro_batch_size=t.micro_batch_size, total_steps=total,
        steps_per_epoch=steps_per_epoch, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        schedule=t.schedule, max_grad_norm=t.max_grad_norm, bf16=t.bf16, seed=t.seed,
        train_blocks=train_ds.to_arrow_refs(), train_rows=n_train,  # each epoch permutes all rows
        log_every=t.log_every, eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every, fail_at_step=t.fail_at_step,
        loss_weights=weights,
        loss_params=cfg.loss.params(),
        reference_free=reference_free, dtype=cfg.model.dtype, gguf_file=None,
        tracker=tracker.spec, has_eval=n_eval > 0,
        prep=ModelPrep(gradient_checkpointing=t.gradient_checkpointing,
                       lora=LoraSettings(**t.lora.model_dump()) if t.lora else None),
        offload_optimizer=t.offload_optimizer, packing=t.packing, max_tokens_per_batch=t.max_tokens_per_batch,
        chunk_tokens=t.logprob_chunk_tokens,
    )
    print(f"[raydpo] training: {n_train} pairs ({n_eval} held out), {t.num_workers} worker(s), "
          f"{total} steps of {t.batch_size} pairs", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name="train",
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets={"eval": eval_ds} if n_eval else {},  # train rows: LoopArgs.train_blocks
        dataset_config=FixedShards(),
    )
    (out / RUN_CONFIG).write_text(json.dumps(flatten(cfg), indent=1, sort_keys=True))  # what the checkpoints train
    progress = TrainProgress(Spool(tracker.spec.spool_dir, "rank0"), total).start()
    try:
        result = trainer.fit()
    finally:
        progress.stop()
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}

    # Record and summarise.
    final = out / "final"
    if cfg.tracking.log_model:
        tracker.log_model(final, cfg.tracking.register_as)
    delivered = tracker.finish("FINISHED", timeout=cfg.tracking.flush_timeout_s)
    seconds = time.perf_counter() - t0
    print(f"[raydpo] run finished in {seconds:.1f}s; final model {final}", flush=True)
    for key in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in metrics:
            print(f"[raydpo]   {key} = {metrics[key]:.4f}")
    print(f"[raydpo] MLflow run {tracker.run_id}: {tracking.ui_hint(tracker.spec.uri, tracker.spec.experiment_id, tracker.run_id)}"
          + ("" if delivered else " (some tracking data is still spooled, see above)"), flush=True)
    return Outcome(tracker.run_id, str(final), metrics, report.to_dict(), seconds)


def _combined(fingerprints: dict[str, str]) -> str:
    """One fingerprint for every source of the run (order-independent)."""
    import hashlib

    return hashlib.blake2b("\n".join(sorted(f"{s}={f}" for s, f in fingerprints.items())).encode(),
                           digest_size=16).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydpo train", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and the workers' own logs")
    ns = parser.parse_args(argv)
    cfg = load_config_or_report(ns.config, ns.overrides)  # fails before Ray starts
    if cfg is None:
        return 2
    try:
        run(cfg, ns.config, verbose=ns.verbose)
    except ConfigError as e:  # a resume with a changed config: before any work
        print(f"raydpo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
