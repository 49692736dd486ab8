"""Calibration statistics: one accumulator per statistic behind a registry, hooked passes that
fill several at once (whole model or block by block), one verified on-disk cache."""

from __future__ import annotations

from basis_sharing.calibration.cache import (
    FORMAT_VERSION,
    StatsCacheError,
    stats_key,
    stats_path,
)
from basis_sharing.calibration.fisher import FisherStats, collect_fisher, fisher_key
from basis_sharing.calibration.grams import (
    ACCUMULATE_DTYPES,
    GramAccumulator,
    GramStats,
    accumulate_dtype_name,
    collect_grams,
    hooked_kinds,
    load_or_collect,
    read_stats,
    save_stats,
)
from basis_sharing.calibration.mlp_inputs import MLPInputs
from basis_sharing.calibration.scales import ScaleStats, collect_scales, scales_key
from basis_sharing.calibration.statistics import (
    STATISTICS,
    Collected,
    collect_forward,
    collect_statistics,
    get_statistic,
    register_statistic,
)

__all__ = [
    "ACCUMULATE_DTYPES",
    "FORMAT_VERSION",
    "STATISTICS",
    "Collected",
    "FisherStats",
    "GramAccumulator",
    "GramStats",
    "MLPInputs",
    "ScaleStats",
    "StatsCacheError",
    "accumulate_dtype_name",
    "collect_fisher",
    "collect_forward",
    "collect_grams",
    "collect_scales",
    "collect_statistics",
    "fisher_key",
    "get_statistic",
    "hooked_kinds",
    "load_or_collect",
    "read_stats",
    "register_statistic",
    "save_stats",
    "scales_key",
    "stats_key",
    "stats_path",
]
