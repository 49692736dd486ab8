"""How many threads a run uses: the CPUs it is allowed, or the user's ``threads=``.

torch (and the BLAS / OpenMP libraries under it) size their thread pools from the machine's cores,
not from what the process may use. Under a CPU affinity mask, a cgroup CPU quota (containers,
Kubernetes) or a SLURM allocation that is smaller than the machine, they start more busy threads
than there are CPUs; OpenMP's spinning barriers then make float64 SVDs and Cholesky factorisations
orders of magnitude slower. The automatic rule takes the smallest of these limits:

- the affinity mask (``os.sched_getaffinity``);
- the cgroup CPU quota, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, over the
  process's cgroup and its ancestors, rounded *down* and at least 1 (1.5 CPUs -> 1 thread: a
  second thread would make the process hit the quota and be throttled every period, stalling the
  threads waiting at a barrier for it);
- ``SLURM_CPUS_PER_TASK``;
- ``OMP_NUM_THREADS``, when the user already set it (its first entry).

Ties go to the first in that order. Without any of them, ``os.cpu_count()``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from basis_sharing.errors import ConfigError

log = logging.getLogger(__name__)

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Limits in the order ties are resolved; the names are how the record says where a count came from.
LIMIT_ORDER = ("affinity", "cgroup", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")
ENV_LIMITS = ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class CpuLimit:
    """The CPUs a process may use: ``count`` and the limit it came from."""

    count: int
    source: str  # one of LIMIT_ORDER, or "os.cpu_count" when nothing limits the process
    limits: dict[str, int | None] = field(default_factory=dict)  # every limit, None = not set


def quota_cpus(quota: int | None, period: int) -> int | None:
    """CPUs a CFS quota allows: floor(quota / period), at least 1; None when unlimited.

    Args:
        quota: microseconds of CPU time per period (None, or negative in cgroup v1: no limit).
        period: the period in microseconds.
    """
    if quota is None or quota < 0 or period <= 0:
        return None
    return max(1, math.floor(quota / period))


def env_cpus(env: Mapping[str, str], name: str) -> int | None:
    """A positive CPU count from an environment variable; None when unset or unreadable.

    OMP_NUM_THREADS may list one count per nesting level ("4,2"): the first is the outer pool.
    """
    raw = env.get(name, "").split(",")[0].strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        log.warning("Ignoring %s=%r: not a positive CPU count.", name, env[name])
        return None
    return value


def allowed_cpus(
    affinity: int | None,
    cgroup: int | None,
    env: Mapping[str, str],
    cpu_count: int | None,
) -> CpuLimit:
    """The automatic thread count: the smallest limit that is set (pure; see module docstring).

    Args:
        affinity: CPUs in the affinity mask (None where the platform has none).
        cgroup: CPUs the cgroup quota allows (``quota_cpus``), None when unlimited.
        env: the environment (``SLURM_CPUS_PER_TASK``, ``OMP_NUM_THREADS`` are read).
        cpu_count: ``os.cpu_count()``, the fallback when nothing else is set.
    """
    limits: dict[str, int | None] = {"affinity": affinity, "cgroup": cgroup}
    limits.update({name: env_cpus(env, name) for name in ENV_LIMITS})
    set_limits = [(limits[name], name) for name in LIMIT_ORDER if limits[name] is not None]
    limits["os.cpu_count"] = cpu_count
    if not set_limits:
        return CpuLimit(max(1, cpu_count or 1), "os.cpu_count", limits)
    count, source = min(set_limits, key=lambda item: item[0])  # min keeps the first of a tie
    return CpuLimit(count, source, limits)


def _read_int_pair(path: Path) -> tuple[int | None, int] | None:
    """v2 ``cpu.max``: "<quota|max> <period>"; None when the file is missing or malformed."""
    try:
        parts = path.read_text().split()
    except OSError:
        return None
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    if parts[0] == "max":
        return None, int(parts[1])
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None


def _read_v1(directory: Path) -> tuple[int | None, int] | None:
    """v1 ``cpu.cfs_quota_us`` (-1: no limit) and ``cpu.cfs_period_us`` of one cgroup."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
        period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota, period


def _ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory under ``base`` and every parent up to ``base``.

    A quota on any ancestor limits the process too. When the path is not visible under ``base``
    (a container whose cgroup namespace hides it), ``base`` itself is the process's cgroup.
    """
    parts = [p for p in cgroup_path.strip().split("/") if p]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()] or [base]


def cgroup_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the tightest cgroup CPU quota on this process allows; None when there is none.

    Reads ``proc_cgroup`` ("<id>:<controllers>:<path>" lines) and, under ``root``, cgroup v2's
    ``cpu.max`` (also under ``root/unified`` on hybrid hosts) and v1's ``cpu`` controller files.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    counts: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            for base in (root, root / "unified"):
                if not base.is_dir():
                    continue
                for d in _ancestors(base, path):
                    pair = _read_int_pair(d / "cpu.max")
                    counts.append(quota_cpus(*pair) if pair else None)
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                base = root / name
                if base.is_dir():
                    for d in _ancestors(base, path):
                        pair = _read_v1(d)
                        counts.append(quota_cpus(*pair) if pair else None)
                    break
    found = [c for c in counts if c is not None]
    return min(found) if found else None


def affinity_cpus() -> int | None:
    """CPUs in this process's affinity mask; None where the platform does not expose one."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def detect_allowed_cpus() -> CpuLimit:
    """``allowed_cpus`` of this process: its affinity, cgroup quota and environment."""
    return allowed_cpus(affinity_cpus(), cgroup_cpus(), os.environ, os.cpu_count())


def check_threads(threads: Any) -> None:
    """The ``threads`` key: null (automatic) or an integer >= 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(
            f"threads={threads} must be an integer >= 1, or null to follow the CPUs this process "
            "is allowed (affinity, cgroup quota, SLURM_CPUS_PER_TASK)."
        )


def blas_pools() -> list[dict[str, Any]] | None:
    """Thread pools of the loaded BLAS / OpenMP libraries (None without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "prefix", "num_threads")
    return [{k: pool.get(k) for k in keys} for pool in threadpool_info()]


def set_threads(count: int) -> None:
    """Size every pool that can still be resized: BLAS/OpenMP libraries, torch intra- and inter-op.

    torch's inter-op pool can be sized only before its first parallel work (a second run in one
    process keeps the first size); the record says what is in effect.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.debug("threadpoolctl is not installed: only torch's own pools are sized.")
    else:
        threadpool_limits(limits=count)  # not used as a context: the limits stay in place
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError as exc:
            log.debug("torch inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)


def apply_threads(requested: int | None) -> dict[str, Any]:
    """Choose and set the run's thread count; returns what the run record stores.

    Args:
        requested: the ``threads`` key; None follows ``detect_allowed_cpus``.
    """
    check_threads(requested)
    allowed = detect_allowed_cpus()
    if requested is None:
        chosen, source = allowed.count, allowed.source
    else:
        chosen, source = requested, "config"
        if requested > allowed.count:
            log.warning(
                "threads=%d is more than the %d CPUs this process is allowed (%s): the threads "
                "will compete for them.",
                requested,
                allowed.count,
                allowed.source,
            )
    set_threads(chosen)
    log.info("Using %d threads (%s).", chosen, source)
    return {
        "requested": requested,
        "chosen": chosen,
        "source": source,
        "allowed": asdict(allowed),
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "blas": blas_pools(),
        # Read by the OpenMP runtime when torch loads it, so only the environment can set it;
        # PASSIVE trades ~10% idle speed for much less loss next to other busy processes.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
