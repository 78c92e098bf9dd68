"""Peak memory of the running process, for the benchmark scripts (both venvs import it: plain Python)."""
from __future__ import annotations

import resource
from pathlib import Path


def vm_hwm_mib() -> float | None:
    """``VmHWM`` (peak resident set) of this process from /proc, MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
