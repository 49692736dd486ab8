"""Wall time and peak memory of one pipeline stage.

Peak RSS per stage: Linux lets a process reset its high-water mark (writing "5" to
/proc/self/clear_refs), so each stage reports its own peak. Some kernels and sandboxes accept the
write but keep the old mark, so the reset is confirmed by reading the mark back (it must equal the
current RSS). Where it cannot be confirmed the peak since process start is reported and the record
says so (``rss_scope: "process"``).
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


_SLACK_BYTES = 4 * 2**20  # pages touched between the reset and the read-back


def _status_bytes() -> dict[str, int]:
    """VmHWM and VmRSS from one read of /proc/self/status (empty where there is none)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark; True only when the read-back confirms it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    status = _status_bytes()
    if "VmHWM" not in status or "VmRSS" not in status:
        return False
    return status["VmHWM"] <= status["VmRSS"] + _SLACK_BYTES


def current_rss_bytes() -> int | None:
    """Resident set size now, where the OS reports it."""
    return _status_bytes().get("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (or since process start)."""
    status = _status_bytes()
    if "VmHWM" in status:
        return status["VmHWM"]
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
