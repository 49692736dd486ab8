"""Wall time and peak memory of one pipeline stage.

Peak RSS per stage: Linux lets a process reset its high-water mark (writing "5" to
/proc/self/clear_refs), so each stage reports its own peak. Where that is not possible the peak
since process start is reported and the record says so (``rss_scope: "process"``).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (or since process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def measure(stats: dict, device: torch.device | str | None = None) -> Iterator[dict]:
    """Fill ``stats`` with wall_s, peak_rss_mb (and cuda_peak_mb on a CUDA device)."""
    device = torch.device(device) if device is not None else None
    on_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    stats["rss_scope"] = "stage" if reset_peak_rss() else "process"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield stats
    finally:
        if on_cuda:
            torch.cuda.synchronize(device)
            stats["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        stats["wall_s"] = round(time.perf_counter() - start, 3)
        stats["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
