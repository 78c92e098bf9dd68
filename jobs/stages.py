"""The stages the jobs share, on the whole config (only ``jobs/`` sees it): each takes the config
and plain values and calls the library with settings objects. Not a job itself.

    prepare  -> the output folder, the model every actor loads, the sources
    data     -> tokenized pairs, every row kept or counted by reason, the report logged
    reference-> reference log-probs through the cache, in an actor pool of their own
    start_run-> the checks before any work, Ray (and, on several nodes, that every node sees the
                run's folders), the MLflow run (what every training job starts with)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.data

from actors.reference import log_stats, reference_cache, reference_stage, summary
from raydpo.config import Config, ConfigError, TrackingConfig, flatten, trajectory_changes, unflatten
from raydpo.data.refcache import Cache, RefStats, sources_identity
from raydpo.progress import say
from raydpo.tracking import Tracker, local_store, resolve_uri


@dataclass(frozen=True)
class Prepared:
    out: Path  # the absolute output folder
    model_path: str  # the HF folder or hub id every actor loads
    sources: list[str]  # the train sources, generated shards included


def prepare(cfg: Config) -> Prepared:
    """The tiny model is built, a GGUF model de-quantized and a pickled one (``model.allow_pickle``)
    converted to safetensors, once into ``{output_dir}/initial``;
    the quickstart's synthetic shards are written to ``{output_dir}/data``."""
    from raydpo.data.sources import mixture_weights
    from raydpo.data.synthetic import write_shards
    from raydpo.models import TINY, has_only_pickles, write_plain, write_safetensors, write_tiny

    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = cfg.model.name_or_path
    if model_path != TINY and Path(model_path).expanduser().exists():
        # Absolute: Ray Train workers run in folders of their own, where a relative path would
        # be taken for a hub id.
        model_path = str(Path(model_path).expanduser().resolve())
    if model_path == TINY:
        t = cfg.model.tiny
        model_path = str(write_tiny(out / "initial", hidden_size=t.hidden_size, num_layers=t.num_layers,
                                    num_heads=t.num_heads, max_positions=t.max_positions, seed=t.seed))
    elif cfg.model.gguf_file:
        model_path = str(write_plain(model_path, cfg.model.gguf_file, out / "initial", cfg.model.dtype))
    elif has_only_pickles(model_path):  # allowed: check_model passed
        model_path = str(write_safetensors(model_path, out / "initial", cfg.model.dtype))
    sources = list(cfg.data.train)
    mixture_weights(sources)  # a source in two weighted entries fails here, before Ray starts
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        sources += write_shards(out / "data", task=s.task, rows=s.rows, seed=s.seed)
    return Prepared(out, model_path, sources)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def ray_data_errors_off_the_console() -> Iterator[None]:
    """Keep Ray Data's ERROR records off the console (its log file still gets them). Ray Data logs
    a failed task's exception, its traceback included, and then raises it in the driver: where
    that is a user's error (a source damaged past its first bytes), the job prints its message
    alone (:func:`report_failure`); any other exception goes on with the worker's traceback in its
    text. On the console those records are a second copy."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    below_error = _BelowError()
    for handler in handlers:
        handler.addFilter(below_error)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(below_error)


def tokenize(cfg: Config, model_path: str, sources: list[str]) -> ray.data.Dataset:
    """Every row of the config's sources, normalised and tokenized (dropped rows too, with their
    reasons), materialized. ``train`` and ``precompute`` share it, so they see the same pairs."""
    from raydpo.data.pipeline import tokenized_dataset

    d = cfg.data
    with ray_data_errors_off_the_console():  # a damaged source is found by a read task
        return tokenized_dataset(sources, d.eval, model_path=model_path, gguf_file=None,
                                 settings=d.tokenize_settings(), eval_fraction=d.eval_fraction, seed=d.seed,
                                 limit=d.limit, columns=d.columns, fmt=d.format, chat_template=d.chat_template,
                                 ranked_pairs=d.ranked_pairs, min_score_margin=d.min_score_margin)  # materialized


def data(cfg: Config, prepared: Prepared, tracker: Tracker) -> tuple[ray.data.Dataset, dict]:
    """Kept pairs (mixed by weight where the sources have weights) and the data report, both
    logged: report, tables, dataset inputs with digests, the data fingerprint. Past
    ``data.max_drop_fraction`` of dropped rows, stops with the report."""
    from raydpo.data.pipeline import DataError, build_report, kept_rows, length_stats, mix_sources
    from raydpo.data.refcache import source_identity
    from raydpo.data.sources import mixture_weights

    d = cfg.data
    tokenized = tokenize(cfg, prepared.model_path, prepared.sources)
    report = build_report(tokenized)
    say(report.summary())
    report.lengths = length_stats(tokenized)  # token-length percentiles, logged with the report
    tracker.log_report(report.to_dict())
    fingerprints = {s: source_identity(s) for s in report.sources}
    for source, counts in report.sources.items():  # MLflow dataset inputs: source, digest, rows
        tracker.log_input(Path(source).name or source, source, fingerprints[source].split(":", 1)[1],
                          context="training", rows=counts["read"])
    tracker.log_params({"fingerprint/data": sources_identity(fingerprints)})
    if report.drop_fraction > d.max_drop_fraction:
        raise DataError(f"dropped {report.drop_fraction:.1%} of rows, over data.max_drop_fraction "
                        f"{d.max_drop_fraction:.1%}: fix the rows (the report below names the reasons and rows; "
                        f"`raydpo data-check CONFIG` gives it without training), or raise data.max_drop_fraction"
                        f"\n{report.summary()}")
    kept = kept_rows(tokenized)
    mixture = mixture_weights(prepared.sources)  # (entry -> weight, source -> entry); None without weights
    if mixture is not None:
        kept, counts = mix_sources(kept, mixture[0], d.seed, groups=mixture[1])
        say("[raydpo] mixture (train pairs used / available): " + ", ".join(
            f"{k} {c['used']}/{c['available']}" for k, c in counts.items()))
        tracker.log_mixture(counts)
    return kept, report.to_dict()


def cache_for(cfg: Config, model_path: str) -> Cache:
    """The reference cache of this config's model, tokenizer, tokenization settings and dtype."""
    return reference_cache(model_path, None, cfg.data.chat_template, cfg.data.tokenize_settings(), cfg.reference)


def reference(cfg: Config, model_path: str, kept: ray.data.Dataset,
              tracker: Tracker) -> tuple[ray.data.Dataset, RefStats]:
    """``kept`` with ``ref_chosen_logps`` / ``ref_rejected_logps``, computed only where the
    cache lacks them, and the stage's figures (logged as ``reference/*``)."""
    with_ref, stats = reference_stage(kept, cache_for(cfg, model_path), model_path=model_path, gguf_file=None,
                                      settings=cfg.reference)
    say(summary(stats))
    log_stats(tracker, stats)
    return with_ref, stats



RUN_CONFIG = "run_config.json"  # in output_dir: the flattened config that trained its checkpoints or rounds


def _stored_checkpoints(cfg: Config, out: Path, saved: dict) -> bool:
    """Whether an offline run's checkpoints lie under ``train.storage_path`` (the saved run's or
    this config's): the job's own ``resumable`` looks only in ``{output_dir}/ray``."""
    from raydpo.train.policy import checkpoint_location, has_checkpoints

    if cfg.online is not None:  # rounds: the job's resumable() sees {output_dir}/rounds
        return False
    paths = {saved.get("train.storage_path"), cfg.train.storage_path} - {None}
    return any(has_checkpoints(*checkpoint_location(p, out)) for p in paths)


def check_resume(cfg: Config, out: Path, resumable: Callable[[Path], bool]) -> None:
    """Before any work: an ``output_dir`` that holds a run's progress (``resumable``: checkpoints,
    rounds; or checkpoints under ``train.storage_path``) resumes only with a config that trains the
    same way; otherwise it would skip the wrong batches and restore another run's optimizer state.
    Harmless keys (``config.RESUME_HARMLESS``) may change. A saved config that cannot be read
    (cut short, damaged bytes) where there is progress to resume fails too: the check cannot be made.
    An offline run's checkpoints are checked here too (``raydpo.train.checkpoints.repair_run``): a
    damaged one is set aside, saying why, and none intact fails now, not after the data stages."""
    if cfg.online is None:  # a round's checkpoints: train_policy checks them
        from raydpo.train.checkpoints import repair_run
        from raydpo.train.policy import checkpoint_location

        repair_run(*checkpoint_location(cfg.train.storage_path, out), say)
    path = out / RUN_CONFIG
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        if not (resumable(out) or _stored_checkpoints(cfg, out, {})):
            return  # no progress to check it against: this run writes it again
        raise ConfigError(
            f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]}): the config that trained "
            f"the checkpoints of output_dir {out} is unknown, so resuming with this one cannot be checked. Restore "
            "the file, or delete it to resume with this config unchecked, or start fresh with a new output_dir "
            f"(or delete {out}).") from e
    if not (resumable(out) or _stored_checkpoints(cfg, out, saved)):
        return
    changes = trajectory_changes(saved, flatten(cfg))
    if changes:
        raise ConfigError(
            f"output_dir {out} holds checkpoints of a run with another config; resuming would train "
            "differently. Changed:\n  " + "\n  ".join(changes) + "\nRe-run with the original values to "
            f"resume, or start fresh with a new output_dir (or delete {out}).")


def check_model(cfg: Config) -> None:
    """Before any work: ``model.name_or_path`` written as a local path (absolute, ``./``, ``../``,
    ``~``, or one that exists) is a model folder (its ``config.json``, or the ``model.gguf_file``);
    anything else is taken for a hub id. A folder of pickled weights is read only with
    ``model.allow_pickle``."""
    from raydpo.models import TINY, has_only_pickles

    path = cfg.model.name_or_path
    local = Path(path).expanduser()
    if path != TINY and (local.is_absolute() or path.startswith(("./", "../", "~")) or local.exists()):
        if not local.is_dir():
            raise ConfigError(f"model.name_or_path: {path} {'is a file' if local.exists() else 'does not exist'}; "
                              "give a model folder (config.json and weights) or a hub id")
        gguf = cfg.model.gguf_file
        if gguf and not (local / gguf).is_file():
            raise ConfigError(f"model.gguf_file: {gguf} is not a file in {path}")
        if not gguf and not (local / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {path} has no config.json: not a Hugging Face model folder")
    if not cfg.model.gguf_file and has_only_pickles(path) and not cfg.model.allow_pickle:
        raise ConfigError(f"model.name_or_path: {path} holds pickled weights (.bin/.pt) and no safetensors; "
                          "a pickle can run code when it is loaded. Convert it to safetensors, or set "
                          "model.allow_pickle: true to convert it once into {output_dir}/initial")


def check_sources(cfg: Config) -> None:
    """Before any work: every source of ``data.train``, ``data.eval`` and ``online.prompts`` names
    something readable (a pattern that matches no file, a plain folder, a FIFO, a file of no rows'
    bytes, a missing package) and a weighted source belongs to one entry; the error names the source."""
    from raydpo.data.sources import expand_sources, mixture_weights
    from raydpo.errors import InputError

    try:
        mixture_weights(cfg.data.train)  # resolves every entry, and checks the weights
        expand_sources(cfg.data.eval)
        if cfg.online is not None:
            expand_sources(cfg.online.prompts)
    except ValueError as e:  # these take config entries only: their errors are about the entries
        if isinstance(e, InputError):
            raise
        raise ConfigError(str(e)) from None


def save_run_config(cfg: Config, out: Path) -> None:
    """The resolved config that a resume is checked against; written whole or not at all (a kill
    mid-write must not leave a truncated file that stops every later resume)."""
    from raydpo.online.rounds import write_json

    write_json(out / RUN_CONFIG, flatten(cfg))


def local_folder(path: str) -> Path | None:
    """A folder path (or ``file://`` URI) as an absolute local path; None for a URI of another
    filesystem (``s3://``, ``gs://``, ...), which every node reaches by itself."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return None
    return Path(path).expanduser().resolve()


def run_folders(cfg: Config) -> dict[str, Path]:
    """The config's local folders that every node of a cluster writes or reads, by key:
    ``output_dir`` (checkpoint staging, final model, rounds), ``train.storage_path`` (checkpoints)
    and ``reference.cache_dir`` (reference log-probs: written by the actors, read by the driver)
    where they are paths, not URIs; the cache only where the run uses one."""
    folders = {"output_dir": cfg.output_dir}
    if cfg.train.storage_path:
        folders["train.storage_path"] = cfg.train.storage_path
    if cfg.loss.needs_reference() or cfg.online is not None:  # the online evaluation reads it too
        folders["reference.cache_dir"] = cfg.reference.cache_dir
    return {key: folder for key, path in folders.items() if (folder := local_folder(path)) is not None}


def unshared_folders(folders: dict[str, Path], seen: dict[str, dict[str, bool]]) -> list[str]:
    """The errors of a multi-node check, one per folder some node does not see. ``seen``: key ->
    {node: whether a task on that node found the marker the driver wrote in the folder}."""
    errors = []
    for key, folder in folders.items():
        blind = sorted(node for node, saw in seen.get(key, {}).items() if not saw)
        if blind:
            uri = "" if key == "output_dir" else ", or an s3:// or gs:// URI"
            errors.append(f"{key}: {folder} is not on storage every node sees ({len(blind)} of "
                          f"{len(seen[key])} nodes do not: {', '.join(blind)}); on a cluster of several "
                          f"nodes give a folder on shared storage (an NFS path every node mounts{uri})")
    return errors


def probe_folders(folders: dict[str, Path], timeout_s: float = 120.0) -> tuple[dict[str, dict[str, bool]], list[str]]:
    """On a Ray cluster of more than one alive node: the driver writes a marker file in each
    folder and a task pinned to every alive node (``NodeAffinitySchedulingStrategy``) looks for it.
    Returns key -> {node: saw it} (empty on one node) and the nodes that did not answer in
    ``timeout_s`` (busy setting up, say; not counted either way). Nodes that join later (an
    autoscaler's) are not checked."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in ray.nodes() if n["Alive"]}
    if len(nodes) < 2 or not folders:
        return {}, []
    token = uuid.uuid4().hex
    markers = {}
    for key, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        markers[key] = folder / f".raydpo-shared-{token}"
        markers[key].write_text(token)

    def sees(paths: list[str], token: str) -> list[bool]:  # nested: pickled by value, runs anywhere
        import os

        return [os.path.isfile(p) and open(p).read() == token for p in paths]

    task = ray.remote(num_cpus=0)(sees)  # no CPU: runs on a node whose CPUs are all taken
    try:
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote([str(m) for m in markers.values()], token): node for node in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        seen: dict[str, dict[str, bool]] = {key: {} for key in folders}
        for ref in ready:
            for key, saw in zip(markers, ray.get(ref)):
                seen[key][nodes[refs[ref]]] = saw
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    for ref in late:
        ray.cancel(ref, force=True)
    return seen, [nodes[refs[ref]] for ref in late]


def check_shared_storage(cfg: Config) -> None:
    """Before any work, on several nodes: every folder of :func:`run_folders` must be one every
    node sees; a node-local one fails naming its key."""
    folders = run_folders(cfg)
    seen, silent = probe_folders(folders)
    if silent:
        say(f"[raydpo] storage check: no answer in time from {', '.join(silent)}; not checked there")
    errors = unshared_folders(folders, seen)
    if errors:
        raise ConfigError("\n".join(errors))
    if seen:
        say(f"[raydpo] shared storage: {', '.join(seen)} seen from {len(next(iter(seen.values())))} nodes")


def unwritable(key: str, folder: Path) -> str | None:
    """Why the run cannot write ``folder`` (the config's ``key``), or None: it is made where
    missing (its parents too) and a file is written in it and removed."""
    import uuid

    above = folder
    # The nearest part of the path that exists (os.path: False, not an error, where a folder on
    # the way may not be entered; making the folder then names the cause).
    while not os.path.exists(above) and above != above.parent:
        above = above.parent
    if not os.path.isdir(above):
        where = "" if above == folder else f"{above} on its path "
        return f"{key}: {folder}: {where}is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".raydpo-write-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        done = "written" if os.path.isdir(folder) else "made"
        return f"{key}: {folder} cannot be {done} ({e.strerror}); give a folder this user can write"
    return None


def check_writable(cfg: Config, tracking: TrackingConfig, cache: bool = False) -> None:
    """Before any work (Ray not started): every local folder the run writes (:func:`run_folders`;
    the reference cache also where ``cache``; the folder of a local MLflow store) can be made and
    written; a :class:`ConfigError` names each that cannot, by its key."""
    folders = run_folders(cfg)
    if cache and (folder := local_folder(cfg.reference.cache_dir)) is not None:
        folders["reference.cache_dir"] = folder
    uri = resolve_uri(tracking.uri)
    store = local_store(uri)
    if store is not None:  # SQLite writes a journal beside its file: its folder must be writable
        folders["tracking.uri" if tracking.uri else f"tracking.uri (unset: {uri})"] = (
            store.parent if uri.startswith("sqlite:") else store)
    errors = [error for key, folder in folders.items() if (error := unwritable(key, folder))]
    if errors:
        raise ConfigError("\n".join(errors))


def start_ray(verbose: bool) -> None:
    """Start a local Ray, or join ``RAY_ADDRESS`` (``ray job submit`` sets it), and say which.
    The workers' output stays in Ray's log folder (progress comes from rank 0's spool) unless
    ``verbose``."""
    import logging
    import os

    import ray

    from raydpo.data.pipeline import bound_oom_retries

    bound_oom_retries()  # before ray.init, which reads it: a task killed for memory is retried a bounded number of times
    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"dashboard_host": "127.0.0.1"}  # a local Ray serves its dashboard on loopback only
    context = ray.init(address=address, ignore_reinit_error=True, log_to_driver=verbose,
                       logging_level=logging.INFO if verbose else logging.WARNING, **local)
    nodes = sum(n["Alive"] for n in ray.nodes())
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "none (started without one)"
    say(f"[raydpo] Ray: {'joined ' + address if address else 'local'}, {nodes} node(s); dashboard {dashboard}")


def in_ray_job_copy() -> bool:
    """Whether this process is a job driver that Ray's job API started in its copy of the working
    folder (``runtime_env.working_dir``, unpacked under Ray's session folder and deleted with it)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # the job supervisor's JobConfig for its driver
    try:
        return bool(raw) and bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def kept_tracking(settings: TrackingConfig, out: Path) -> TrackingConfig:
    """The tracking settings of a run whose MLflow data outlives it. A submitted job runs in Ray's
    copy of the working folder, which Ray deletes with its session: a local store there (no
    ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``: MLflow's default in the working folder; or a
    relative path) would go with it. Such a run logs to ``{output_dir}/mlflow.db`` instead (on
    storage every node sees, checked before), and says so."""
    store = local_store(resolve_uri(settings.uri))
    here = Path.cwd().resolve()
    if not in_ray_job_copy() or store is None or not store.resolve().is_relative_to(here) or out.is_relative_to(here):
        return settings
    kept = f"sqlite:///{out / 'mlflow.db'}"
    say(f"[raydpo] tracking.uri {settings.uri or 'unset'} is a store in Ray's copy of the working folder, which Ray "
        f"deletes with its session: this run logs to {kept} (output_dir) instead")
    return settings.model_copy(update={"uri": kept})


def start_run(cfg: Config, config_path: str | None, verbose: bool, job: str,
              resumable: Callable[[Path], bool]) -> Tracker:
    """Checks that fail before any work (a folder the run cannot write, a changed config on resume,
    a model path that is no model, a source that names nothing readable, a node-local folder on a
    cluster of several nodes, an unreachable tracking server), with Ray started or joined, then
    the MLflow run with its params and config. Says where the Ray dashboard and the run are."""
    from raydpo import tracking
    from raydpo.progress import quiet_libraries

    out = Path(cfg.output_dir).expanduser().resolve()
    settings = kept_tracking(cfg.tracking, out)
    check_writable(cfg, settings)
    check_resume(cfg, out, resumable)
    check_model(cfg)
    check_sources(cfg)
    if not verbose:
        quiet_libraries()
    start_ray(verbose)
    check_shared_storage(cfg)
    tracker, resumed = Tracker.start(settings, out, cfg.tracking.run_name,
                                     tags={"raydpo.job": job})
    say(f"[raydpo] MLflow run {tracker.run_id} ({'resumed' if resumed else 'new'}) at "
        f"{tracking.display_uri(tracker.spec.uri)}")
    flat = flatten(cfg)
    tracker.log_params(flat | tracking.versions())  # the tracker masks secrets in params
    masked = tracking.mask_secrets(flat)
    tracker.log_dict(unflatten(masked), "config.yaml")
    if config_path and masked == flat:  # the file as written, unless it holds a secret
        tracker.log_artifact(config_path)
    return tracker


def user_failure(error: BaseException) -> Exception | None:
    """The error whose message alone tells the user what failed, wherever it was raised (the
    driver, a Ray task or actor, a Ray Train worker): an :class:`InputError`, the user's to fix
    (exit 2); or an unwritable checkpoint, lost training or data workers, an unreachable tracking
    store (exit 1).
    None for anything else (a bug: shown with its traceback), and for a SIGTERM or Ctrl-C, which
    end their own way."""
    from raydpo.data.pipeline import DataWorkerLost
    from raydpo.errors import find_cause, input_error
    from raydpo.tracking import TrackingError
    from raydpo.train.loop import CheckpointWriteError
    from raydpo.train.policy import WorkersLost

    if not isinstance(error, Exception):
        return None
    # Ray Train keeps the workers' exceptions (WorkerGroupError) and its controller's
    # (ControllerError) apart from its own chain.
    workers = [getattr(f, "_base_exc", f) for f in getattr(error, "worker_failures", {}).values()]
    controller = getattr(error, "controller_failure", None)
    errors = [error, *workers, *([controller] if isinstance(controller, BaseException) else [])]
    for e in errors:
        if (found := input_error(e)) is not None:
            return found
    said = (CheckpointWriteError, WorkersLost, DataWorkerLost, TrackingError)  # their messages say what to do
    for e in errors:
        if (found := find_cause(e, said)) is not None:
            return found
    return None


@contextlib.contextmanager
def failing_run(tracker: Tracker, timeout_s: float,
                preempted: Callable[[BaseException], object]) -> Iterator[None]:
    """Around a job's work: where it raises, the MLflow run ends FAILED (KILLED where
    ``preempted(error)``), and a user's error or failed checkpoint raised inside Ray is raised as
    itself (:func:`user_failure`): its message says it all, Ray's wrapping repeats the traceback."""
    try:
        yield
    except BaseException as e:
        tracker.finish("KILLED" if preempted(e) else "FAILED", timeout=timeout_s)
        failure = user_failure(e)
        if failure is not None and failure is not e:
            raise failure from None
        raise


def report_failure(error: BaseException) -> int | None:
    """:func:`user_failure`'s message alone on stderr, and the exit code (2: the user's input, 1:
    the rest); None where ``error`` is not one (the caller re-raises it)."""
    import sys

    from raydpo.errors import InputError

    failure = user_failure(error)
    if failure is None:
        return None
    print(f"raydpo: {failure}", file=sys.stderr)
    return 2 if isinstance(failure, InputError) else 1


def training_job_main(argv: list[str] | None, prog: str, description: str | None,
                      run: Callable[..., object]) -> int:
    """The command line of a training job (``raydpo train``, ``raydpo iterate``): ``CONFIG
    [--set KEY=VALUE ...] [--verbose]``; exit 2, with the message alone, on a bad config (before
    Ray starts), a folder the run cannot write or a resume with a changed config (before any
    work), or any other user's error (:class:`InputError`: too many dropped rows, a bad source,
    a damaged checkpoint), wherever raised; 143 on a SIGTERM; 1, with the message alone, where
    the workers' checkpoint could not be written, they or a data stage's workers were lost, or
    the tracking store is away."""
    import argparse
    import sys

    from raydpo.config import load_config_or_report

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and the workers' own logs")
    ns = parser.parse_args(argv)
    cfg = load_config_or_report(ns.config, ns.overrides)
    if cfg is None:
        return 2
    from actors.preemption import EXIT_CODE, Preempted  # after the config check: a bad one fails without torch

    try:
        run(cfg, ns.config, verbose=ns.verbose)
    except Preempted as e:
        print(f"raydpo: {e}", file=sys.stderr)
        return EXIT_CODE
    except Exception as e:
        code = report_failure(e)
        if code is None:
            raise
        return code
    return 0
