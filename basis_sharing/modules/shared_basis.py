"""One member of a layer group sharing a basis: y = (x B) C_j (+ bias), B registered once.

A basis shared by a group of layers lives in the model-level ``ModuleDict`` ``model.shared_bases``
(key ``"<kind>_g<group>"``); each member holds an unregistered reference to that registry and
looks its basis up at call time, so a parameter count, a state dict or a LoRA adapter sees the one
real copy, and safetensors stores it once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from basis_sharing.modules.base import CompressedLinear, LayoutError, TwoFactorLinear
from basis_sharing.modules.factors import meta_linear
from basis_sharing.modules.registry import register_module_type

SHARED_BASES = "shared_bases"


def shared_bases(model: nn.Module) -> nn.ModuleDict:
    """The model's registry of shared bases, created on first use."""
    registry = getattr(model, SHARED_BASES, None)
    if registry is None:
        registry = nn.ModuleDict()
        setattr(model, SHARED_BASES, registry)
    return registry


def check_registered(
    registry: nn.ModuleDict, key: str, root: nn.Module, layer: int, kind: str
) -> None:
    """A module's shared basis must be ``root.shared_bases[key]``, or it would not be saved.

    Raises:
        LayoutError: the basis lives in another registry, or not under ``key``.
    """
    if registry is not getattr(root, SHARED_BASES, None) or key not in registry:
        raise LayoutError(
            f"Layer {layer} projection '{kind}' uses basis '{key}' that is not in "
            f"model.{SHARED_BASES}; it would not be saved. Build shared layers with "
            "basis_sharing.modules.shared_bases(model) as the registry."
        )


@register_module_type
class SharedBasisLinear(TwoFactorLinear):
    """y = coefficient(B(x)) with B = ``registry[basis_key]`` shared by the whole group.

    Only the coefficient is registered here. Kept weights: k d_out for the member, plus d_in k
    for the basis the first time it is counted. Its layout entry names the basis (``basis_key``).
    """

    layout_type = "shared"
    entry_keys = (*CompressedLinear.entry_keys, "basis_key")

    def __init__(self, registry: nn.ModuleDict, basis_key: str, coefficient: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "_registry", registry)  # not a child: counted and saved once
        self.basis_key = basis_key
        self.coefficient = coefficient

    @property
    def shared_basis_key(self) -> str:
        return self.basis_key

    @property
    def basis(self) -> nn.Module:
        return self._registry[self.basis_key]

    def extra_repr(self) -> str:
        return f"basis={SHARED_BASES}[{self.basis_key!r}]"

    def layout_entry(self, layer: int, kind: str, root: nn.Module) -> dict[str, Any]:
        check_registered(self._registry, self.basis_key, root, layer, kind)
        return {**super().layout_entry(layer, kind, root), "basis_key": self.basis_key}

    @classmethod
    def value_problems(cls, entry: dict[str, Any]) -> list[str]:
        problems = super().value_problems(entry)
        if not (isinstance(entry["basis_key"], str) and entry["basis_key"]):
            problems.append(f"a shared entry needs a basis_key, got {entry['basis_key']!r}")
        return problems

    @classmethod
    def registry_shapes(cls, entry: dict[str, Any]) -> dict[str, tuple[int, int]]:
        return {entry["basis_key"]: (entry["d_in"], entry["rank"])}

    @classmethod
    def from_layout(
        cls, entry: dict[str, Any], root: nn.Module, dtype: torch.dtype | None = None
    ) -> SharedBasisLinear:
        d_in, rank, d_out = entry["d_in"], entry["rank"], entry["d_out"]
        coefficient = meta_linear(rank, d_out, entry["bias"], dtype)
        registry = shared_bases(root)
        key = entry["basis_key"]
        if key not in registry:
            registry[key] = meta_linear(d_in, rank, False, dtype)
        return cls(registry, key, coefficient)
