"""An on-disk spool of tracking operations: written before each send, so none is lost while the
tracking server is down, and none is sent twice.

One spool per writer process (``driver``, ``rank0``) in the run's spool folder:

- ``<writer>.jsonl``: append-only JSON lines, one operation each (``{"op": "metrics", ...}``);
- ``<writer>.sent``: the byte offset up to which operations have been delivered, replaced
  atomically after each delivery;
- ``<writer>.lock``: an exclusive ``flock`` held while delivering, so two processes (a resumed
  run and ``raydpo sync-tracking``) never send the same operation concurrently.

A line is only read once it ends in a newline, so a writer killed mid-line leaves a tail that is
ignored, never half an operation. No MLflow here: :mod:`raydpo.tracking` delivers the operations.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

SUFFIX = ".jsonl"


class Spool:
    """The spool file of one writer. ``append`` is thread-safe within the process."""

    def __init__(self, folder: Path, writer: str) -> None:
        self.folder = Path(folder)
        self.writer = writer
        self.path = self.folder / f"{writer}{SUFFIX}"
        self._sent_path = self.folder / f"{writer}.sent"
        self._lock_path = self.folder / f"{writer}.lock"
        self._append_lock = threading.Lock()

    def append(self, op: dict[str, Any]) -> None:
        """Add one operation; it is on disk (in the OS's cache) when this returns."""
        line = json.dumps(op, separators=(",", ":"), allow_nan=True) + "\n"
        with self._append_lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)

    def sent_offset(self) -> int:
        try:
            return int(self._sent_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def mark_sent(self, offset: int) -> None:
        tmp = self._sent_path.with_suffix(".sent.tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self._sent_path)

    def pending(self, limit: int = 10_000) -> list[tuple[dict[str, Any], int]]:
        """Up to ``limit`` undelivered operations, each with the offset just past its line."""
        return self.pending_from(self.sent_offset(), limit)

    def pending_from(self, offset: int, limit: int | None = None) -> list[tuple[dict[str, Any], int]]:
        """Complete operations from byte ``offset`` on (0: all this writer ever logged)."""
        out: list[tuple[dict[str, Any], int]] = []
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return out
        with f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n") or (limit is not None and len(out) >= limit):
                    break  # a line still being written, or enough for one delivery
                offset += len(raw)
                out.append((json.loads(raw), offset))
        return out

    def pending_count(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size <= self.sent_offset():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.sent_offset())
            return sum(1 for raw in f if raw.endswith(b"\n"))

    @contextlib.contextmanager
    def delivering(self) -> Iterator[None]:
        """Hold this spool's delivery lock (blocks while another process delivers it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def spools(folder: Path) -> list[Spool]:
    """Every writer's spool in ``folder`` (none where it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [Spool(folder, p.name[: -len(SUFFIX)]) for p in sorted(folder.glob(f"*{SUFFIX}"))]
