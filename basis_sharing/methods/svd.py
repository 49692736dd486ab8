"""Plain truncated SVD (docs/methods.md §5.2): no data, rank from the same parameter budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from basis_sharing.methods.factorized import FactorizedMethod, FactorizedMethodConfig
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import register_method
from basis_sharing.models.families import FamilyAdapter


@dataclass
class SVDMethodConfig(FactorizedMethodConfig):
    """Plain truncated SVD (docs/methods.md §5.2): nothing beyond the shared settings."""


@register_method("svd", schema=SVDMethodConfig)
class SVD(FactorizedMethod):
    """W ~ U_k Sigma_k V_k^T per projection, k = floor(d_in d_out (1 - p) / (d_in + d_out)).

    The identity scaling makes the shared machinery compute exactly the Eckart-Young optimum.
    """

    label = "SVD"

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        return torch.eye(plan.d_in, dtype=torch.float64, device=device), 0.0

    def cache_tag(self) -> tuple:
        return ("identity",)
