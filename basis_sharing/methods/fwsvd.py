"""Fisher-weighted SVD (Hsu et al., ICLR 2022; docs/methods.md §5.3).

Each input row of W (y = x W layout) is weighted by the square root of its Fisher importance,
the squared LM-loss gradients summed over calibration batches and over the output dimension:
minimise ||I^ (W - A B)||_F with I^ = diag(sqrt(fisher_row + eps)). The SVD of I^ W gives
A = I^{-1} U_k Sigma_k, B = V_k^T, which the shared machinery computes with S = I^.
"""

from __future__ import annotations

from typing import Any

import torch

from basis_sharing.methods.factorized import FactorizedMethod
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import register_method
from basis_sharing.models.families import FamilyAdapter


@register_method("fwsvd")
class FWSVD(FactorizedMethod):
    stats_needed = frozenset({"fisher"})

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        (layer,) = plan.layers
        rows = stats["fisher"].rows[(layer, plan.kind)].to(device, torch.float64)
        return torch.diag(torch.sqrt(rows + self.cfg.eps)), 0.0

    def cache_tag(self) -> tuple:
        return ("fisher", self.cfg.eps)
