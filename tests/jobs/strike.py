"""Striking a real run mid-way: wait for a training step, freeze its worker, send the fault, and
read what the run left (trained-rows lines, registered checkpoints). Shared by the fault tests of
``raydpo train`` (tests/jobs/test_faults.py) and ``raydpo iterate`` (tests/jobs/test_iterative_dpo.py).

A training worker is frozen (SIGSTOP) before a fault that must land mid-run, so a fast machine
cannot finish first; the fault itself is real.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEADLINE_S = 600  # a bound on any wait, so a broken run fails the test instead of hanging it


_PARSED: dict[Path, tuple[tuple[int, int], list[dict]]] = {}  # path -> ((mtime ns, size), its lines)


def trained_rows(out: Path) -> list[dict]:
    """Rank 0's trained-rows lines (``raydpo.train.loop.TrainedRows``); a line still being
    written is left out. The file is parsed again only when its size or mtime changed: the waits
    below ask every 10 ms, in the process that may be the run's driver."""
    path = out / "trained_rows" / "rank0.jsonl"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    seen = _PARSED.get(path)
    if seen is not None and seen[0] == (stat.st_mtime_ns, stat.st_size):
        return list(seen[1])
    lines = [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]
    _PARSED[path] = ((stat.st_mtime_ns, stat.st_size), lines)
    return list(lines)


def by_step(out: Path) -> dict[int, dict]:
    return {line["step"]: line for line in trained_rows(out)}


def wait_until(condition: Callable[[], bool], what: str, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {DEADLINE_S}s"
        time.sleep(0.01)


def wait_for_step(out: Path, step: int, old_pids: set[int], alive: Callable[[], bool] = lambda: True) -> dict:
    """The first trained-rows line at ``step`` or later by a worker not in ``old_pids``."""
    found: list[dict] = []

    def reached() -> bool:
        found[:] = [line for line in trained_rows(out) if line["step"] >= step and line["pid"] not in old_pids]
        return bool(found)

    wait_until(reached, f"a new worker at step {step}", alive)
    return found[0]


def freeze(pid: int, out: Path) -> int:
    """SIGSTOP a training worker; returns the last step it finished (it writes no more)."""
    os.kill(pid, signal.SIGSTOP)
    return max(line["step"] for line in trained_rows(out) if line["pid"] == pid)


def first_step_of(pid: int, out: Path) -> dict:
    return min((line for line in trained_rows(out) if line["pid"] == pid), key=lambda line: line["step"])


def pid_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def checkpoint_folders(out: Path) -> list[int]:
    """The steps of the checkpoint folders in Ray Train's storage for ``out``, oldest first."""
    folders = sorted((out / "ray" / "train").glob("checkpoint_*"))  # named by time
    return [json.loads((f / "loop_state.json").read_text())["step"]
            for f in folders if (f / "loop_state.json").exists()]


def checkpoints(out: Path, run_folder: Path | None = None) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for ``out``, oldest first: the ones a
    re-run or a restart can resume from. Ray Train 2.60 records them in this snapshot when its
    controller receives a report, on its next poll of the workers (every 2 s), not when the
    folder is written. ``run_folder``: Ray Train's folder where ``train.storage_path`` is set
    (``{storage_path}/{name}``, ``raydpo.train.policy.checkpoint_location``); else ``out/ray/train``."""
    folder = run_folder or out / "ray" / "train"
    snapshot = folder / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except json.JSONDecodeError:  # being rewritten
        return []
    return [json.loads((folder / r["checkpoint_dir_name"] / "loop_state.json").read_text())["step"]
            for r in results]


class Strike:
    """``with Strike(fault):`` runs ``fault(running)`` in a thread while the body runs, where
    ``running()`` turns False once the body is done (so a fault that never found its moment ends);
    what the thread raised is raised here. ``seconds``: the body's wall time."""

    def __init__(self, fault: Callable[[Callable[[], bool]], None]) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

        def target() -> None:
            try:
                fault(lambda: not self.done.is_set())
            except BaseException as e:  # noqa: BLE001 - raised by __exit__
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.seconds = 0.0

    def __enter__(self) -> "Strike":
        self.t0 = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self.t0
        self.done.set()
        self.thread.join(60)
        if self.error is not None and exc[0] is None:
            raise self.error
