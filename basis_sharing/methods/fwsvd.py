"""Fisher-weighted SVD (Hsu et al., ICLR 2022; docs/methods.md §5.3).

Each input row of W (y = x W layout) is weighted by the square root of its Fisher importance,
the squared LM-loss gradients summed over calibration batches and over the output dimension:
minimise ||I^ (W - A B)||_F with I^ = diag(sqrt(fisher_row + eps)). The SVD of I^ W gives
A = I^{-1} U_k Sigma_k, B = V_k^T, which the shared machinery computes with S = I^.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from basis_sharing.methods.factorized import (
    FactorizedMethod,
    FactorizedMethodConfig,
    check_positive,
)
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import register_method
from basis_sharing.models.families import FamilyAdapter


@dataclass
class FWSVDMethodConfig(FactorizedMethodConfig):
    """Fisher-weighted SVD (docs/methods.md §5.3)."""

    eps: float = 1e-5  # inside the square root of the Fisher row importance


@register_method("fwsvd", schema=FWSVDMethodConfig)
class FWSVD(FactorizedMethod):
    """Fisher-weighted truncated SVD of every projection.

    Not block by block (``supports_sequential = False``): the Fisher rows are squared gradients
    of the LM loss, which need a backward pass through the whole model at once.
    """

    label = "FWSVD"
    stats_needed = frozenset({"fisher"})
    supports_sequential = False

    def check_config(self, family: FamilyAdapter | None) -> None:
        super().check_config(family)
        check_positive("eps", self.cfg.eps)  # eps = 0 leaves a zero-importance row singular

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        (layer,) = plan.layers
        rows = stats["fisher"].rows[(layer, plan.kind)].to(device, torch.float64)
        return torch.diag(torch.sqrt(rows + self.cfg.eps)), 0.0

    def cache_tag(self) -> tuple:
        return ("fisher", self.cfg.eps)
