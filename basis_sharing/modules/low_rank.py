"""A private factorisation y = (x B) C (+ bias): both factors belong to this layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from basis_sharing.modules.base import CompressedLinear, TwoFactorLinear
from basis_sharing.modules.factors import meta_linear
from basis_sharing.modules.registry import register_module_type


@register_module_type
class LowRankLinear(TwoFactorLinear):
    """y = coefficient(basis(x)): basis is nn.Linear(d_in -> k), coefficient nn.Linear(k -> d_out).

    Kept weights: k (d_in + d_out). Its layout entry has ``basis_key`` null.
    """

    layout_type = "lowrank"
    entry_keys = (*CompressedLinear.entry_keys, "basis_key")

    def __init__(self, basis: nn.Linear, coefficient: nn.Linear) -> None:
        super().__init__()
        self.basis = basis
        self.coefficient = coefficient

    def layout_entry(self, layer: int, kind: str, root: nn.Module) -> dict[str, Any]:
        return {**super().layout_entry(layer, kind, root), "basis_key": None}

    @classmethod
    def value_problems(cls, entry: dict[str, Any]) -> list[str]:
        problems = super().value_problems(entry)
        if entry["basis_key"] is not None:
            problems.append(f"a lowrank entry has no basis_key, got {entry['basis_key']!r}")
        return problems

    @classmethod
    def from_layout(
        cls, entry: dict[str, Any], root: nn.Module, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        d_in, rank, d_out = entry["d_in"], entry["rank"], entry["d_out"]
        coefficient = meta_linear(rank, d_out, entry["bias"], dtype)
        return cls(meta_linear(d_in, rank, False, dtype), coefficient)
