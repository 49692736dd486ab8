"""One entry point for every calibration statistic a method can ask for, cached on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from basis_sharing.calibration.cache import load_or_collect, stats_key
from basis_sharing.calibration.fisher import collect_fisher, fisher_key, load_or_collect_fisher
from basis_sharing.calibration.grams import collect_grams
from basis_sharing.calibration.scales import collect_scales, load_or_collect_scales, scales_key
from basis_sharing.models.families import FamilyAdapter


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
) -> tuple[str, Any, bool]:
    """(cache key, statistic, cache hit) for ``name`` in {"gram", "scale", "fisher"}."""
    if name == "gram":
        key = stats_key(model_identity, calibration_hash, gram_dtype)
        stats, hit = load_or_collect(
            cache_dir,
            key,
            lambda: collect_grams(
                model, family, calibration_ids, batch_size, getattr(torch, gram_dtype)
            ),
            meta=meta,
        )
        return key, stats, hit
    if name == "scale":  # per-batch sums: the batch size is part of the key
        key = scales_key(model_identity, calibration_hash, batch_size)
        stats, hit = load_or_collect_scales(
            cache_dir,
            key,
            lambda: collect_scales(model, family, calibration_ids, batch_size),
            meta=meta,
        )
        return key, stats, hit
    if name == "fisher":
        key = fisher_key(model_identity, calibration_hash, batch_size)
        stats, hit = load_or_collect_fisher(
            cache_dir,
            key,
            lambda: collect_fisher(model, family, calibration_ids, batch_size),
            meta=meta,
        )
        return key, stats, hit
    raise ValueError(f"unknown calibration statistic {name!r}")
