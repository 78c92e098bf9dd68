"""Ray Data streams the input: the driver's memory stays flat as the input grows (issue 3).

One generated JSONL of 200k small rows goes through what ``raydpo data-check`` runs
(``tokenized_dataset`` -> materialize -> ``build_report`` -> ``length_stats``) while a thread samples
the driver's resident set size; its peak may exceed the level before the run by less than 200 MB.
A tiny run first loads Ray Data's own modules into the driver, so the bound is on what the input
costs, not on imports.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from raydpo.data.pipeline import build_report, length_stats, tokenized_dataset
from raydpo.data.tokenize import TokenizeSettings

ROWS = 200_000
MAX_GROWTH = 200 * 2**20  # bytes
KEEP_EVERY = 10  # see _write_rows


def _rss() -> int:
    """The driver's resident set size in bytes (psutil, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status") from None
    return psutil.Process().memory_info().rss


class _PeakRss:
    """Samples ``_rss()`` every ``interval`` seconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakRss:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _write_rows(path: Path, n: int) -> None:
    """``n`` standard rows, written line by line (the driver never holds them).

    Every ``KEEP_EVERY``-th row is a real pair; the others have ``chosen == rejected`` and are
    dropped as ``identical`` before tokenization. Why: tokenizing a pair costs ~0.75 ms (four
    chat-template renders and four tokenizer calls), 150 CPU-seconds for 200k pairs, over this
    test's budget; and the driver's memory does not depend on how many rows are kept, because
    token ids never reach it (``build_report`` reads the small columns of every row, ``length_stats``
    one int per part and kept row). Every 50th row is broken instead, so the other reasons count too."""
    broken = ['{"prompt": "cut', json.dumps({"prompt": "q", "chosen": "a"})]
    with path.open("w") as f:
        for i in range(n):
            if i % 50 == 49:
                f.write(broken[(i // 50) % 2] + "\n")
            else:
                rejected = "n" if i % KEEP_EVERY == 0 else "y"
                f.write(json.dumps({"prompt": f"q{i % 997}", "chosen": "y", "rejected": rejected}) + "\n")


def _check(path: Path):
    tokenized = tokenized_dataset([str(path)], [], model_path="tiny", gguf_file=None,
                                  settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0).materialize()
    report = build_report(tokenized)
    report.lengths = length_stats(tokenized)
    return report


@pytest.mark.slow  # 200k rows through Ray Data, the driver's memory sampled
def test_driver_memory_stays_flat_over_200k_rows(ray_local, tmp_path):
    warm = tmp_path / "warm.jsonl"
    _write_rows(warm, 100)
    assert _check(warm).read == 100  # loads Ray Data's modules into the driver before the baseline

    big = tmp_path / "big.jsonl"
    _write_rows(big, ROWS)
    before = _rss()
    t0 = time.perf_counter()
    with _PeakRss() as rss:
        report = _check(big)
    print(f"{ROWS} rows checked in {time.perf_counter() - t0:.1f}s")
    growth = rss.peak - before
    print(f"driver RSS {before / 2**20:.0f} MiB before, peak {rss.peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)")

    n_broken = ROWS // 50
    n_kept = sum(1 for i in range(0, ROWS, KEEP_EVERY) if i % 50 != 49)
    assert report.read == ROWS
    assert report.kept + sum(report.dropped.values()) == report.read
    assert report.kept == report.sources[str(big)]["kept"] == n_kept
    assert report.dropped == {"unparseable": n_broken // 2, "missing_field": n_broken // 2,
                              "identical": ROWS - n_broken - n_kept}
    assert report.lengths["chosen"]["max"] == report.lengths["chosen"]["p50"] > 0
    assert growth < MAX_GROWTH, f"driver RSS grew by {growth / 2**20:.0f} MiB over {ROWS} rows"
