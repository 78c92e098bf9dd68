"""The one place that talks to MLflow: :class:`Tracker`.

The driver starts the run (:meth:`Tracker.start`) and hands training rank 0 a small picklable
:class:`TrackerSpec`; rank 0 opens the same class from it (:meth:`Tracker.open`). Every write
(metrics, params, tags, artifacts, the model, the run's end) is first appended to an on-disk spool
in the output folder (:mod:`raydpo.spool`) and delivered by a background thread, so:

- training never waits on the network: a write returns once it is on disk;
- a server outage loses nothing: the thread retries until the server is back, then delivers
  in order; what a process could not deliver before it ended is delivered by the next one that
  opens the run (a resumed run), or by ``raydpo sync-tracking OUTPUT_DIR``;
- nothing is delivered twice: an operation is marked sent only after MLflow accepted it, and
  metrics carry the timestamp they were logged with, so re-sending one after a crash between
  "accepted" and "marked" writes the identical row, which MLflow's SQL stores keep once.

At the start an unreachable server fails fast, before any compute (:class:`TrackingError`).
Everything goes through an explicit ``MlflowClient(uri)``, never MLflow's global active run, so
the driver and the workers name the same store and run without shared state.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from raydpo.spool import Spool, spools

RUN_ID_FILE = "mlflow_run_id"  # in output_dir: a re-run of the same output_dir continues the run
SPOOL_DIR = "tracking"  # in output_dir: the spools and the files their artifact operations name
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
MAX_RETRY_S = 5.0  # longest wait between delivery attempts while the store is away
SECRET_KEY = re.compile(r"(^|[_.\-])(token|secret|password|passwd|api_?key|access_?key|key)$", re.IGNORECASE)
# MLflow errors that mean "this operation will never be accepted" (not "the server is away"):
# such an operation is reported and skipped instead of blocking the spool behind it forever.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                    "PERMISSION_DENIED", "UNAUTHENTICATED"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable at the start, or refused the run)."""


def resolve_uri(uri: str | None) -> str:
    """Config ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's local default; local
    paths made absolute, because Ray workers run in other directories."""
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def local_store(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``resolve_uri``'s ``sqlite:///`` and
    ``file://`` forms); None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file://"):
        return Path(urlsplit(uri).path)
    return None


def display_uri(uri: str) -> str:
    """``uri`` without a password in its network location (for logs and the console)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: its page on a server, or the command that serves a local store."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{display_uri(uri).rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def mask_secrets(params: dict[str, Any]) -> dict[str, Any]:
    """Values whose last key segment names a token, secret, password or key become ``***``;
    passwords inside URIs are masked too."""
    out = {}
    for k, v in params.items():
        if v is not None and SECRET_KEY.search(k.rsplit(".", 1)[-1]):
            out[k] = "***"
        elif isinstance(v, str) and "://" in v:
            out[k] = display_uri(v)
        else:
            out[k] = v
    return out


def versions() -> dict[str, str]:
    """``version/<package>`` of the libraries a run depends on, and ``git/commit`` where there is one."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("raydpo", "ray", "torch", "transformers", "deepspeed", "peft", "mlflow"):
        try:
            out[f"version/{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version/{pkg}"] = "not installed"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git/commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, not a clone
    return out


@dataclass(frozen=True)
class TrackerSpec:
    """What a process needs to log into a run: picklable, sent to the training workers."""

    uri: str
    run_id: str
    output_dir: str  # absolute; on storage every node sees
    experiment_id: str = "0"
    system_metrics: bool = False  # rank 0 samples CPU, memory and GPU into the run

    @property
    def spool_dir(self) -> Path:
        """This run's spools: one folder per run, so a spool is only ever delivered to its run."""
        return Path(self.output_dir) / SPOOL_DIR / self.run_id


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _bounded_http() -> None:
    """MLflow's HTTP client retries a request for minutes by default; our spool retries forever
    on its own, so one attempt is kept short (seconds) and the sender stays responsive.
    A user's explicit setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _error_code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


def _transient(e: Exception) -> bool:
    """Whether ``e`` means "the store is away for now" (retry later), not "this operation will
    never be accepted" (MLflow refused it, or a bug): network errors and MLflow's server-side
    errors are; MLflow's client-side refusals and any other exception are not."""
    if isinstance(e, OSError):  # requests' ConnectionError and Timeout are OSErrors
        return True
    code = _error_code(e)
    return code is not None and code not in PERMANENT_ERRORS


class Tracker:
    """Logs into one MLflow run through a spool; see the module docstring.

    Build it with :meth:`start` (driver: creates or resumes the run) or :meth:`open` (a worker,
    from the driver's :attr:`spec`). ``writer`` names this process's spool (``driver``, ``rank0``).
    Call :meth:`close` (or :meth:`finish` on the driver) at the end.
    """

    def __init__(self, spec: TrackerSpec, writer: str, say: Callable[[str], None] | None = None,
                 sample_system: bool | None = None) -> None:
        _bounded_http()
        self.spec = spec
        self.run_id = spec.run_id
        self.spool = Spool(spec.spool_dir, writer)
        self._say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self._client = _client(spec.uri)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self.outages = 0  # times the server went away while this process was logging
        self.delivered = 0
        self.rejected = 0
        self._down_since: float | None = None
        self._monitor = None
        self._thread = threading.Thread(target=self._run, name=f"raydpo-tracker-{writer}", daemon=True)
        self._thread.start()
        if spec.system_metrics if sample_system is None else sample_system:
            self._start_system_metrics(writer)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def start(cls, settings, output_dir: Path, run_name: str | None, tags: dict[str, str] | None = None,
              say: Callable[[str], None] | None = None, resume: bool = True) -> tuple["Tracker", bool]:
        """Create the run, or (``resume``) reopen the one ``output_dir`` started; returns
        ``(tracker, resumed)``.

        ``settings`` is the config's ``tracking`` section (``uri``, ``experiment``,
        ``system_metrics``). Fails fast with :class:`TrackingError` when the store is unreachable,
        before any compute. Whatever an earlier process of this run left undelivered in the
        spool is delivered first, in order."""
        from mlflow.exceptions import MlflowException

        from raydpo.config import ConfigError

        _bounded_http()
        uri = resolve_uri(settings.uri)
        try:
            client = _client(uri)
        except MlflowException as e:  # a scheme MLflow has no store for: the user's to fix
            raise ConfigError(f"tracking.uri: {display_uri(uri)}: {' '.join(e.message.split())}") from None
        try:
            exp = client.get_experiment_by_name(settings.experiment)
        except Exception as e:
            raise TrackingError(f"MLflow at {display_uri(uri)} (tracking.uri) is unreachable: {e}\n"
                                "Start the server, or point tracking.uri at a local store such as "
                                "sqlite:///mlflow.db") from e
        id_file = output_dir / RUN_ID_FILE
        run_id, resumed = None, False
        if id_file.exists() and resume:
            old = id_file.read_text().strip()
            try:
                client.get_run(old)
                run_id, resumed = old, True
            except Exception as e:
                if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":  # a transient error is not a wiped store
                    raise TrackingError(f"cannot read run {old} at {display_uri(uri)}: {e}") from e
                say_ = say or (lambda m: print(m, file=sys.stderr, flush=True))
                say_(f"[raydpo] MLflow run {old} (from {id_file}) is not in {display_uri(uri)}: starting a new run")
        if run_id is None:
            exp_id = exp.experiment_id if exp else client.create_experiment(settings.experiment)
            run_id = client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
            output_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        else:
            exp_id = client.get_run(run_id).info.experiment_id
            client.update_run(run_id, status="RUNNING")
        spec = TrackerSpec(uri, run_id, str(output_dir), experiment_id=exp_id, system_metrics=settings.system_metrics)
        spec.spool_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SPOOL_DIR / "uri").write_text(uri)  # for `raydpo sync-tracking`
        tracker = cls(spec, "driver", say, sample_system=False)  # training rank 0 samples, not the driver
        tracker.deliver_all(timeout=60)  # what an earlier process of this run left
        deliver_leftovers(output_dir, uri, skip=run_id, timeout=0, say=say)  # and of earlier runs here
        if tags and resumed:
            tracker.set_tags(tags)
        return tracker, resumed

    @classmethod
    def open(cls, spec: TrackerSpec, writer: str, say: Callable[[str], None] | None = None) -> "Tracker":
        """The tracker of a worker process, from the driver's spec."""
        return cls(spec, writer, say)

    # -- writes (spooled; they return at once) ---------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._put({"op": "metrics", "step": int(step), "ts": int(time.time() * 1000), "values": values})

    def log_plots(self, step: int, margins: list[float] | None = None) -> None:
        """Redraw the run's plots from every metric logged so far and log them as ``plots/*.png``
        (:mod:`raydpo.plots`): loss and reward accuracy, chosen and rejected log-probs against
        step, and the histogram of the eval pairs' reward margins at ``step``. The history is this
        writer's spool, read back whole, so a resumed process plots the steps of the ones before
        (a re-trained step keeps its last value)."""
        from raydpo import plots

        folder = Path(self.spec.output_dir) / "plots"
        history = plots.history_from_rows((k, op["step"], v) for op, _ in self.spool.pending_from(0)
                                          if op["op"] == "metrics" for k, v in op["values"].items())
        drawn = [plots.training_curves(history, folder / "training_curves.png"),
                 plots.logps_curves(history, folder / "logps.png")]
        if margins:
            drawn.append(plots.margin_histogram(margins, folder / "eval_margins.png", step=step))
        for path in drawn:
            if path is not None:
                self.log_artifact(path, "plots")

    def log_rounds_plot(self, rounds: list[dict[str, float]]) -> None:
        """``plots/rounds.png``: judge score (with its deviation) and KL to the initial policy of
        the policy after each round, ``rounds[i]`` being round ``i`` (0: the initial policy), and
        the score-vs-KL frontier (:func:`raydpo.plots.rounds_plot`)."""
        from raydpo import plots

        path = plots.rounds_plot(rounds, Path(self.spec.output_dir) / "plots" / "rounds.png")
        if path is not None:
            self.log_artifact(path, "plots")

    def log_params(self, params: dict[str, Any]) -> None:
        """Params as strings (dicts and lists as JSON), secrets masked. On a resumed run, keys
        that exist keep their first value (MLflow refuses to change a param)."""
        values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000]
                  for k, v in sorted(mask_secrets(params).items())}
        self._put({"op": "params", "values": values})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path: Path | str, artifact_path: str | None = None) -> None:
        """A file or folder, uploaded as it is when delivered (a plot rewritten later uploads
        its newest version)."""
        self._put({"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (or YAML for ``.yaml``), kept in the spool folder until delivered."""
        path = self.spec.spool_dir / "files" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            path.write_text(yaml.safe_dump(obj, sort_keys=False))
        else:
            path.write_text(json.dumps(obj, indent=2, default=str))
        parent = str(Path(artifact_file).parent)
        self.log_artifact(path, None if parent == "." else parent)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows of one table in MLflow's table format (the UI's artifact viewer shows it):
        columns in first-seen order, a missing cell 0."""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self._put({"op": "table", "artifact_file": artifact_file,
                   "data": {k: [r.get(k, 0) for r in rows] for k in columns}})

    def log_input(self, name: str, source: str, digest: str, context: str, rows: int) -> None:
        """A dataset the run read, through MLflow's dataset inputs: source, digest and rows."""
        self._put({"op": "input", "name": name, "source": source, "digest": digest, "context": context,
                   "rows": int(rows)})

    def log_model(self, folder: Path | str, register_as: str | None = None, task: str = "text-generation") -> None:
        """The HF folder with ``mlflow.transformers`` (tokenizer, task, signature); as a plain
        artifact folder ``model/`` where that fails. Registered under ``register_as`` if set."""
        self._put({"op": "model", "path": str(Path(folder).resolve()), "register_as": register_as, "task": task})

    def end(self, status: str) -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` (delivered after all else)."""
        self._put({"op": "end", "status": status, "ts": int(time.time() * 1000)})

    def _put(self, op: dict[str, Any]) -> None:
        self.spool.append(op)
        self._idle.clear()
        self._wake.set()

    # -- delivery --------------------------------------------------------------------------------

    def pending(self) -> int:
        return sum(s.pending_count() for s in spools(self.spec.spool_dir))

    def flush(self, timeout: float | None) -> bool:
        """Wait until this process's spool is delivered (at most ``timeout`` s); True when it is."""
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.spool.pending_count():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._idle.wait(0.2 if left is None else min(left, 0.2))
            self._wake.set()
        return True

    def deliver_all(self, timeout: float | None) -> bool:
        """Deliver every writer's spool in the folder (what earlier or other processes of this
        run left), once each; with ``timeout`` 0 a single attempt. True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 1.0
        while True:
            for spool in spools(self.spec.spool_dir):
                if spool.writer != self.spool.writer:
                    self._deliver(spool)
            self._wake.set()
            left = self.pending()
            if not left:
                return True
            if deadline is not None and time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop sampling, deliver what this process logged (at most ``timeout`` s), stop the
        thread. What is left stays in the spool for the next process or ``raydpo sync-tracking``."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
            self._monitor = None
        done = self.flush(timeout)
        if not done and self._down_since is not None:
            # Still away: the tag goes last into the spool, so whoever delivers the spool (the
            # driver, a resumed run, sync-tracking) sets it after everything it vouches for.
            self.set_tags({f"raydpo.tracking.outage_{self.spool.writer}":
                           f"{self.outages} outage(s), the last until after this process ended; "
                           "its spool was delivered later; nothing lost"})
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if not done:
            self._say(f"[raydpo] MLflow at {display_uri(self.spec.uri)} is unreachable: "
                      f"{self.spool.pending_count()} tracking operation(s) kept in {self.spool.path}; "
                      f"they are sent when this run resumes, or by `raydpo sync-tracking "
                      f"{self.spec.output_dir}`")
        return done

    def finish(self, status: str, timeout: float | None = 120.0) -> bool:
        """The driver's end: every other process's spool delivered (the workers' last steps;
        waiting at most ``timeout`` s in all for an away server), then the run marked ``status``.
        What is still undelivered then stays in the spools, and the run's status with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        others = self.deliver_all(timeout)
        self.end(status)
        done = self.close(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        return others and done

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            ok = self._deliver(self.spool)
            if ok:
                delay = 1.0
                if not self.spool.pending_count():
                    self._idle.set()
            else:
                self._stop.wait(delay)  # the server is away: back off (seconds), keep the spool
                delay = min(delay * 2, MAX_RETRY_S)
                self._wake.set()

    def _deliver(self, spool: Spool) -> bool:
        """Send ``spool``'s pending operations in order; False if the server is unreachable."""
        with spool.delivering():
            while True:
                ops = spool.pending(limit=2000)
                if not ops:
                    return True
                for group, end in _groups(ops):
                    try:
                        self._send(group)
                    except Exception as e:
                        if _transient(e):
                            self._went_down(e)
                            return False
                        self.rejected += len(group)  # retrying would block every later operation behind it
                        self._say(f"[raydpo] a {group[0]['op']} operation could not be logged to MLflow, "
                                  f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                    spool.mark_sent(end)
                    self.delivered += len(group)
                    self._came_back()

    def _went_down(self, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            first = str(e).splitlines()[0][:200]
            self._say(f"[raydpo] MLflow at {display_uri(self.spec.uri)} is unreachable ({first}); training goes on, "
                      f"metrics are kept in {self.spool.folder} and sent when it returns")

    def _came_back(self) -> None:
        if self._down_since is None:
            return
        down = time.monotonic() - self._down_since
        self._down_since = None
        self._say(f"[raydpo] MLflow is back after {down:.0f}s; the spooled operations were delivered")
        try:
            self._client.set_tag(self.run_id, f"raydpo.tracking.outage_{self.spool.writer}",
                                 f"{self.outages} outage(s), last {down:.0f}s; nothing lost")
        except Exception:
            pass

    def _send(self, group: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c, run_id, kind = self._client, self.run_id, group[0]["op"]
        if kind == "metrics":
            batch = [Metric(k, v, op["ts"], op["step"]) for op in group for k, v in op["values"].items()]
            for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                c.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])
        elif kind == "params":
            existing = c.get_run(run_id).data.params
            items = [Param(k, v) for op in group for k, v in op["values"].items() if k not in existing]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                c.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for op in group for k, v in op["values"].items()])
        elif kind == "artifact":
            op = group[0]
            if Path(op["path"]).is_dir():
                c.log_artifacts(run_id, op["path"], op["artifact_path"])
            elif Path(op["path"]).exists():
                c.log_artifact(run_id, op["path"], op["artifact_path"])
            else:  # deleted since it was logged: nothing to upload, not a reason to block
                self._say(f"[raydpo] artifact {op['path']} no longer exists; not uploaded")
        elif kind == "table":
            self._send_table(group[0])
        elif kind == "input":
            self._send_input(group[0])
        elif kind == "model":
            self._send_model(group[0])
        elif kind == "end":
            c.set_terminated(run_id, status=group[0]["status"], end_time=group[0]["ts"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _send_table(self, op: dict[str, Any]) -> None:
        """One table, replacing an earlier one of the same name. ``MlflowClient.log_table`` appends
        to an existing table (downloading it first, with a progress bar), so a resumed run, or an
        operation delivered again after an outage, would list its rows twice. This writes the file
        ``log_table`` writes (pandas "split" JSON) and sets the tag the UI reads, as it does."""
        import tempfile

        import pandas as pd
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        name = op["artifact_file"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            pd.DataFrame(op["data"]).to_json(path, orient="split", index=False, date_format="iso")
            parent = str(Path(name).parent)
            self._client.log_artifact(self.run_id, str(path), None if parent == "." else parent)
        logged = json.loads(self._client.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": name, "type": "table"}
        if entry not in logged:
            self._client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged + [entry]))

    def _send_input(self, op: dict[str, Any]) -> None:
        import warnings

        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(op["source"])  # local path, s3://, gs://, http(s)://
        except Exception:  # generated data or a scheme MLflow has no source class for
            source = CodeDatasetSource({"uri": op["source"]})
        entity = Dataset(name=op["name"], digest=op["digest"][:36], source_type=source._get_source_type(),
                         source=source.to_json(), profile=json.dumps({"num_rows": op["rows"]}))
        self._client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", op["context"])])])

    def _send_model(self, op: dict[str, Any]) -> None:
        """``mlflow.transformers.log_model`` (it needs MLflow's active run: only this thread uses
        one, here); the folder as artifacts ``model/`` where that fails. Loads the model on this
        process's CPU."""
        import mlflow

        folder, register_as = op["path"], op["register_as"]
        self._client.get_run(self.run_id)  # raises while the server is away: retried, not degraded
        try:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            mlflow.set_tracking_uri(self.spec.uri)
            # A local folder has no hub model card or license to fetch; MLflow warns about both.
            logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="model", task=op["task"],
                                              registered_model_name=register_as, pip_requirements=_requirements())
            self._client.set_tag(self.run_id, "raydpo.model", "mlflow.transformers")
            return
        except Exception as e:
            self._say(f"[raydpo] mlflow.transformers could not log the model ({str(e).splitlines()[0][:160]}); "
                      "logging the folder as artifacts model/")
        self._client.log_artifacts(self.run_id, folder, "model")
        self._client.set_tag(self.run_id, "raydpo.model", "artifacts")
        if register_as:
            mlflow.register_model(f"runs:/{self.run_id}/model", register_as)

    def _start_system_metrics(self, writer: str) -> None:
        """MLflow's own sampler of CPU, memory, disk, network and GPU, as ``system/*`` metrics.
        It sends directly (not through the spool): samples taken while the server is away are
        not training metrics and are not kept."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, node_id=writer, tracking_uri=self.spec.uri,
                                                 resume_logging=True)
            self._monitor.start()
        except Exception as e:  # psutil missing, or the sampler failed: training goes on
            self._say(f"[raydpo] MLflow system metrics are off: {e}")
            self._monitor = None

    # -- reports ---------------------------------------------------------------------------------

    def log_report(self, report: dict[str, Any]) -> None:
        """The data report (``DataReport.to_dict()``) as JSON and as tables, plus metrics.

        Artifacts: ``data_report.json`` (the whole dict); ``data_report_table.json`` (a row per
        source: read, kept, truncated, ``dropped_<reason>``); ``data_lengths_table.json`` (a row per
        part: prompt/chosen/rejected, p50/p90/p99/max tokens over kept pairs) when the report has
        ``lengths``; the mixture tables (:meth:`log_mixture`) when it has ``mixture``. Metrics:
        ``data/read``, ``data/kept``, ``data/truncated``, ``data/dropped_<reason>``,
        ``data/<part>_tokens_<stat>``."""
        self.log_dict(report, "data_report.json")
        rows = [
            {"source": s, "read": c["read"], "kept": c["kept"], "truncated": c["truncated"],
             **{f"dropped_{k}": v for k, v in sorted(c["dropped"].items())}}
            for s, c in report["sources"].items()
        ]
        if rows:
            self.log_table(rows, "data_report_table.json")
        metrics = {"data/read": report["read"], "data/kept": report["kept"], "data/truncated": report["truncated"]}
        metrics |= {f"data/dropped_{reason}": n for reason, n in report["dropped"].items()}
        lengths = report.get("lengths") or {}
        if lengths:
            self.log_table([{"part": part, **stats} for part, stats in lengths.items()], "data_lengths_table.json")
            metrics |= {f"data/{part}_tokens_{stat}": v for part, stats in lengths.items()
                        for stat, v in stats.items() if v is not None}  # None: no kept pair
        self.log_metrics(metrics, step=0)
        if report.get("mixture"):
            self.log_mixture(report["mixture"])

    def log_mixture(self, mixture: dict[str, dict[str, Any]]) -> None:
        """The weighted mixture (entry -> {available, used, weight}) as ``data_mixture.json`` and
        ``data_mixture_table.json`` (a row per entry)."""
        self.log_dict(mixture, "data_mixture.json")
        rows = [{"entry": label, "weight": c["weight"], "available": c["available"], "used": c["used"]}
                for label, c in mixture.items()]
        if rows:
            self.log_table(rows, "data_mixture_table.json")


def _requirements() -> list[str]:
    """The model's pip requirements, given (MLflow's inference imports the model in a subprocess:
    tens of seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "accelerate"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out


def _groups(ops: list[tuple[dict[str, Any], int]]):
    """Consecutive metrics (or params, or tags) operations merged into one delivery; every other
    operation alone. Yields ``(operations, offset past the last)``."""
    group: list[dict[str, Any]] = []
    end = 0
    for op, offset in ops:
        if group and (op["op"] != group[0]["op"] or op["op"] not in ("metrics", "params", "tags")):
            yield group, end
            group = []
        group.append(op)
        end = offset
    if group:
        yield group, end


def deliver_leftovers(output_dir: Path, uri: str, skip: str | None = None, timeout: float | None = 0,
                      say: Callable[[str], None] | None = None) -> int:
    """Deliver the spools of every run in ``output_dir`` (each into its own run) but ``skip``;
    returns the operations still pending."""
    left = 0
    root = output_dir / SPOOL_DIR
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if folder.name == skip or not any(s.pending_count() for s in spools(folder)):
            continue
        tracker = Tracker(TrackerSpec(uri, folder.name, str(output_dir)), "sync", say, sample_system=False)
        tracker.deliver_all(timeout)
        left += tracker.pending()
        tracker.close(timeout=0)
    return left


def sync(output_dir: Path, timeout: float | None = None, say: Callable[[str], None] | None = None) -> int:
    """``raydpo sync-tracking``: deliver every spool the runs in ``output_dir`` left, each into
    its own run, the nested runs of online rounds (``rounds/NNN/``) included; returns the
    operations still pending (0 when all arrived)."""
    uri_file = output_dir / SPOOL_DIR / "uri"
    if not uri_file.exists():
        raise TrackingError(f"{output_dir} holds no spooled tracking ({uri_file} is missing)")
    uri = uri_file.read_text().strip()
    folders = [output_dir] + sorted(p for p in (output_dir / "rounds").glob("*") if (p / SPOOL_DIR).is_dir())
    return sum(deliver_leftovers(folder, uri, timeout=timeout, say=say) for folder in folders)