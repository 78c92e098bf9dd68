"""Shared fixtures: one real local Ray for the session, a real MLflow store per test."""
from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so each fit ends (and registers a
# checkpoint) up to 2 s after the workers did; the suite runs about 20 fits. Ray Train passes this
# setting to its controller from the driver's environment; set here, it also reaches the jobs the
# tests start as subprocesses and the test clusters' nodes. Polling is all it changes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


_PREBUILD: list = []  # the background build of DeepSpeed's C++ ops (pytest_collection_finish)


def pytest_collection_finish(session) -> None:
    """Build the DeepSpeed JIT ops the session's tests will need in a background process, while
    the first tests run, instead of inside the first test that needs them: the CPU ``shm_comm``
    (any DeepSpeed engine on CPUs; about 25 s on 2 cores the first time) and, where a test is
    marked ``cpu_adam``, ``cpu_adam`` (``offload_optimizer``; about 40 s). torch's extension
    loader holds a lock in the build folder, so a test that gets there first waits for this build
    instead of starting another; an op built before only loads."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    items = session.items
    ops = [op for op, needed in (
        ("ShareMemCommBuilder", any("deepspeed" in item.nodeid or "zero" in item.nodeid for item in items)),
        ("CPUAdamBuilder", any(item.get_closest_marker("cpu_adam") for item in items))) if needed]
    if not ops or importlib.util.find_spec("deepspeed") is None:
        return
    log = open(Path(tempfile.gettempdir()) / "raydpo-deepspeed-ops.log", "w")  # the compiler's output, if it fails
    _PREBUILD.append(subprocess.Popen([sys.executable, "-m", "tests.deepspeed_ops", *ops], cwd=session.config.rootpath,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


def pytest_sessionfinish(session, exitstatus) -> None:
    """The background build is waited for (one cut short would leave its lock behind)."""
    for proc in _PREBUILD:
        try:
            proc.wait(600)
        except Exception:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def sigint_handler_kept(request):
    """A test that leaves another SIGINT handler behind is named (a warning) and the handler put
    back: a later test's Ctrl-C (tests/jobs/test_submit.py) must reach Python's own."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        warnings.warn(f"{request.node.nodeid} left the SIGINT handler {after!r} (was {before!r}); put back")
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs (what CI has), stopped at the end of the session."""
    import ray

    # address="local": always a new instance, even where another Ray head runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    yield ray
    ray.shutdown()


_MIGRATED_STORE: list[Path] = []  # one empty SQLite store with MLflow's schema, made once per session


def fresh_store(path: Path) -> Path:
    """A real, empty MLflow SQLite store at ``path``: a copy of one migrated at the first call.
    MLflow migrates a new SQLite file from scratch (about 4 s in process and 45 s inside a
    starting ``mlflow server`` on 2 cores); the copy is the same schema in 0.1 s."""
    import atexit
    import shutil
    import tempfile

    if not _MIGRATED_STORE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="raydpo-mlflow-template-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the tables
        _MIGRATED_STORE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MIGRATED_STORE[0], path)
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A real MLflow SQLite store of this test's own."""
    return f"sqlite:///{fresh_store(tmp_path / 'mlflow.db')}"


SHARED = Path(__file__).resolve().parents[2] / "shared"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact folder; it
    can be stopped and restarted on the same port and store. Stopped by its own process group."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port, self.proc = root, free_port(), None
        fresh_store(root / "mlflow.db")
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: stop() reaches its workers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout}s")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown, seconds) or, with ``kill``, SIGKILL: an instant outage."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A started :class:`MlflowServer` of this test's own; stopped at the end."""
    server = MlflowServer(tmp_path / "mlflow-server").start()
    yield server
    server.stop()
