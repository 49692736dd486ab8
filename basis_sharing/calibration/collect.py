"""The single-statistic form of ``statistics.collect_statistics`` (what calibrate() calls today)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from basis_sharing.calibration.statistics import collect_statistics
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.sequential import BlockRunner


def collect_statistic(
    name: str,
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    gram_dtype: str,
    model_identity: dict[str, Any],
    calibration_hash: str,
    cache_dir: Path,
    meta: dict[str, Any],
    runner: BlockRunner | None = None,
) -> tuple[str, Any, bool]:
    """(cache key, statistic, cache hit) for one registered statistic ("gram", "scale", ...).

    Collecting several statistics with ``collect_statistics`` in one call shares the forward
    pass between them; this form runs one pass per statistic.
    """
    collected = collect_statistics(
        [name],
        model,
        family,
        calibration_ids,
        batch_size,
        gram_dtype,
        model_identity,
        calibration_hash,
        cache_dir,
        meta,
        runner,
    )[name]
    return collected.key, collected.value, collected.cache_hit
