"""Activation-aware SVD (Yuan et al., 2023; docs/methods.md §5.4).

Input channel j of W (y = x W) is scaled by s_j^alpha, s_j its calibration activation magnitude
(``abs_mean``: the sum over batches of the mean |x_j|; ``abs_max``), so that channels carrying large
activations are approximated more accurately: the SVD of D W with D = diag(s^alpha) + 1e-6 is
truncated and D^{-1} folded back into the basis (the shared machinery's S = D).

Ranks: each projection keeps a fraction r of its weights, rank = floor(r d_in d_out / (d_in +
d_out)). ``allocation=uniform`` uses r = 1 - ratio everywhere; ``allocation=sensitivity`` (ASVD's
default) measures, for every projection and every candidate r, the calibration perplexity with only
that projection compressed, then binary-searches a perplexity threshold: each projection takes the
smallest r whose perplexity stays under it (or stays dense), and the threshold is the lowest one
whose plan meets the global parameter target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.calibration.scales import SCALE_METHODS
from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.methods.factorized import FactorizedMethod, FactorizedMethodConfig
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import CompressionContext, register_method
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import LowRankLinear, basis_linear, coefficient_linear
from basis_sharing.runtime.windows import window_nlls

log = logging.getLogger(__name__)

ALLOCATIONS = ("sensitivity", "uniform")


@dataclass
class ASVDMethodConfig(FactorizedMethodConfig):
    """Activation-aware SVD (docs/methods.md §5.4)."""

    scale: str = "abs_mean"  # or abs_max
    alpha: float = 0.5
    allocation: str = "sensitivity"  # or uniform
    candidate_ratios: list[float] = field(
        default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # fractions of weights kept
    )
    sensitivity_samples: int = 8  # calibration blocks scored per candidate


def kept_rank(d_in: int, d_out: int, kept: float) -> int:
    """ASVD's rank for a projection keeping a fraction ``kept`` of its weights."""
    return math.floor(kept * d_in * d_out / (d_in + d_out))


def choose_threshold(
    table: dict[tuple[int, str], dict[float, float]],
    shapes: dict[tuple[int, str], tuple[int, int]],
    target_kept: int,
) -> dict[tuple[int, str], float]:
    """Per-projection kept fraction from sensitivity ``table`` meeting ``target_kept`` weights.

    For a threshold t, projection p keeps the smallest candidate r with ppl[p][r] <= t, or stays
    dense (r = 1.0). Kept weights fall as t rises; the lowest t whose plan keeps at most
    ``target_kept`` weights is chosen by binary search over the measured perplexities.
    """

    def allocation(t: float) -> dict[tuple[int, str], float]:
        return {
            p: min((r for r, v in row.items() if v <= t), default=1.0) for p, row in table.items()
        }

    def kept(alloc: dict[tuple[int, str], float]) -> int:
        total = 0
        for p, r in alloc.items():
            d_in, d_out = shapes[p]
            total += d_in * d_out if r >= 1.0 else kept_rank(d_in, d_out, r) * (d_in + d_out)
        return total

    # -inf: every projection dense, the answer when the target asks for no compression at all.
    measured = {v for row in table.values() for v in row.values() if math.isfinite(v)}
    thresholds = [-math.inf, *sorted(measured)]
    lo, hi = 0, len(thresholds) - 1
    if kept(allocation(thresholds[hi])) > target_kept:
        raise ConfigError(
            "ASVD's candidate ratios cannot reach the target: even the smallest candidate on every "
            "projection keeps too many weights. Add smaller method.candidate_ratios or lower ratio."
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(allocation(thresholds[mid])) <= target_kept:
            hi = mid
        else:
            lo = mid + 1
    return allocation(thresholds[lo])


@register_method("asvd", schema=ASVDMethodConfig)
class ASVD(FactorizedMethod):
    """Activation-scaled truncated SVD with a per-projection rank allocation (module docstring).

    Not block by block (``supports_sequential = False``): the sensitivity allocation measures the
    whole model's calibration perplexity with each projection compressed in turn.
    """

    label = "ASVD"
    stats_needed = frozenset({"scale"})
    supports_sequential = False
    # The last sensitivity search's perplexities, from plan() to compress()'s record.
    sensitivity_ppl: dict | None = None

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        (layer,) = plan.layers
        s = stats["scale"].scale(layer, family.projection(plan.kind).input, self.cfg.scale)
        diag = s.to(device, torch.float64).pow(self.cfg.alpha) + 1e-6
        return torch.diag(diag), 0.0

    def cache_tag(self) -> tuple:
        return ("scale", self.cfg.scale, self.cfg.alpha)

    def check_config(self, family: FamilyAdapter | None) -> None:
        super().check_config(family)
        if self.cfg.scale not in SCALE_METHODS:
            raise unknown_choice("method.scale", self.cfg.scale, SCALE_METHODS)
        if self.cfg.allocation not in ALLOCATIONS:
            raise unknown_choice("method.allocation", self.cfg.allocation, ALLOCATIONS)
        if not 0.0 <= self.cfg.alpha <= 1.0:  # `not` also refuses NaN
            raise ConfigError(
                f"method.alpha={self.cfg.alpha} must be in [0, 1] (0: no activation scaling, "
                "1: the full scale; ASVD uses 0.5)."
            )
        # A kept fraction of 1 would be measured as a truncation but planned as a dense
        # projection (the allocation's "stays dense"), so candidates stay below 1.
        candidates = list(self.cfg.candidate_ratios)
        if not candidates or not all(0.0 < r < 1.0 for r in candidates):
            raise ConfigError(
                f"method.candidate_ratios={candidates}: give at least one kept fraction, each "
                "in (0, 1)."
            )
        if self.cfg.sensitivity_samples < 1:
            raise ConfigError(
                f"method.sensitivity_samples={self.cfg.sensitivity_samples} must be >= 1."
            )

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        # The sensitivity allocation needs calibration perplexities; uniform needs only shapes.
        if self.cfg.allocation != "uniform":
            return None
        return super().shape_plan(model, family, ratio)

    def plan(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext):
        self.check_config(family)
        layers = family.layers(model)
        shapes = {
            (i, k): family.shape(layer, k) for i, layer in enumerate(layers) for k in family.kinds
        }
        if self.cfg.allocation == "uniform":
            kept = dict.fromkeys(shapes, 1.0 - ctx.ratio)
        elif self.cfg.allocation == "sensitivity":
            table = self.cached_sensitivity(model, family, shapes, ctx)
            target = math.floor((1.0 - ctx.ratio) * sum(a * b for a, b in shapes.values()))
            kept = choose_threshold(table, shapes, target)
            self.sensitivity_ppl = {f"{i}.{k}": row for (i, k), row in table.items()}
        else:
            raise ConfigError(
                f"method.allocation={self.cfg.allocation!r}: use sensitivity or uniform."
            )
        plans = []
        for (i, kind), r in kept.items():
            if r >= 1.0:
                continue  # stays dense
            d_in, d_out = shapes[(i, kind)]
            plans.append(GroupPlan(kind, i, (i,), d_in, d_out, kept_rank(d_in, d_out, r)))
        return plans

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        info = super().compress(model, family, ctx)
        info["allocation"] = self.cfg.allocation
        info["sensitivity_ppl"], self.sensitivity_ppl = self.sensitivity_ppl, None
        return info

    def cached_sensitivity(self, model, family, shapes, ctx):
        """The sensitivity table, measured once per sweep for a calibration setup.

        It does not depend on the target ratio, so the jobs of a ratio sweep share it through
        the sweep's caches (``ctx.caches``) when the run has them and a statistics key.
        """
        run_key = ctx.stats_key
        if run_key is None or ctx.caches is None:
            return self.sensitivity(model, family, shapes, ctx)
        key = (
            run_key,
            *self.cache_tag(),
            tuple(self.cfg.candidate_ratios),
            self.cfg.sensitivity_samples,
        )
        tables = ctx.caches.sensitivity
        if key not in tables:
            tables[key] = self.sensitivity(model, family, shapes, ctx)
        return tables[key]

    def sensitivity(self, model, family, shapes, ctx) -> dict[tuple[int, str], dict[float, float]]:
        """Calibration perplexity with one projection compressed at each candidate ratio."""
        ids = ctx.calibration_ids[: self.cfg.sensitivity_samples]
        flat = ids.reshape(-1)
        bounds = [(j * ids.shape[1], (j + 1) * ids.shape[1]) for j in range(ids.shape[0])]
        layers = family.layers(model)
        table: dict[tuple[int, str], dict[float, float]] = {}
        for (i, kind), (d_in, d_out) in tqdm(
            shapes.items(), desc="asvd: sensitivity", unit="proj", leave=False
        ):
            plan = GroupPlan(kind, i, (i,), d_in, d_out, min(d_in, d_out))
            dec = self.decomposition(layers, family, plan, ctx)
            original = family.module(layers[i], kind)
            dtype = original.weight.dtype
            row = {}
            try:
                for r in self.cfg.candidate_ratios:
                    basis, (coeff,) = dec.truncate(max(1, kept_rank(d_in, d_out, r)))
                    bias = family.bias(layers[i], kind)
                    family.set_module(
                        layers[i],
                        kind,
                        LowRankLinear(
                            basis_linear(basis, dtype), coefficient_linear(coeff, bias, dtype)
                        ),
                    )
                    nll = window_nlls(model, flat, bounds, ctx.calib_batch_size, desc="")
                    row[float(r)] = math.exp(float(nll.mean()))
            finally:
                family.set_module(layers[i], kind, original)
            table[(i, kind)] = row
        return table
