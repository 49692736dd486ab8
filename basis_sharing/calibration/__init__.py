"""Calibration statistics: forward hooks, streaming Gram accumulators, an on-disk cache."""

from __future__ import annotations

from basis_sharing.calibration.cache import (
    FORMAT_VERSION,
    StatsCacheError,
    load_or_collect,
    read_stats,
    save_stats,
    stats_key,
    stats_path,
)
from basis_sharing.calibration.grams import (
    ACCUMULATE_DTYPES,
    GramAccumulator,
    GramStats,
    accumulate_dtype_name,
    collect_grams,
    hooked_kinds,
)

__all__ = [
    "ACCUMULATE_DTYPES",
    "FORMAT_VERSION",
    "GramAccumulator",
    "GramStats",
    "StatsCacheError",
    "accumulate_dtype_name",
    "collect_grams",
    "hooked_kinds",
    "load_or_collect",
    "read_stats",
    "save_stats",
    "stats_key",
    "stats_path",
]
