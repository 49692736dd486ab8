"""Drop-in compressed projections (surgery at the leaf, docs/architecture.md §5.3).

A compressed projection computes y = (x B) C (+ bias): B (d_in x k) is the basis, C (k x d_out) the
coefficients. Both are plain ``nn.Linear`` children (weights B^T and C^T), so PEFT, optimisers and
safetensors see ordinary tensors. A basis shared by a group of layers is registered exactly once,
in the model-level ``ModuleDict`` ``model.shared_bases`` (key ``"<kind>_g<group>"``); the member
layers hold an unregistered reference to that registry and look the basis up at call time, so a
parameter count, a state dict or a LoRA adapter sees the one real copy.
"""

from __future__ import annotations

import torch
from torch import nn

SHARED_BASES = "shared_bases"


def basis_linear(basis: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """nn.Linear(d_in -> k, no bias) computing x B, from B (d_in, k)."""
    d_in, k = basis.shape
    layer = nn.Linear(d_in, k, bias=False, device=basis.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(basis.T)
    return layer


def coefficient_linear(
    coefficients: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> nn.Linear:
    """nn.Linear(k -> d_out) computing h C + bias, from C (k, d_out) and the original bias."""
    k, d_out = coefficients.shape
    layer = nn.Linear(k, d_out, bias=bias is not None, device=coefficients.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(coefficients.T)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LowRankLinear(nn.Module):
    """A private factorisation: y = coefficient(basis(x)); both factors belong to this layer."""

    def __init__(self, basis: nn.Linear, coefficient: nn.Linear) -> None:
        super().__init__()
        self.basis = basis
        self.coefficient = coefficient

    @property
    def rank(self) -> int:
        return self.basis.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient(self.basis(x))


class SharedBasisLinear(nn.Module):
    """One member of a layer group: y = coefficient(B(x)) with B shared by the whole group.

    Only the coefficient is registered here; the basis lives in ``registry[basis_key]``.
    """

    def __init__(self, registry: nn.ModuleDict, basis_key: str, coefficient: nn.Linear) -> None:
        super().__init__()
        object.__setattr__(self, "_registry", registry)  # not a child: counted and saved once
        self.basis_key = basis_key
        self.coefficient = coefficient

    @property
    def basis(self) -> nn.Module:
        return self._registry[self.basis_key]

    @property
    def rank(self) -> int:
        return self.coefficient.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient(self._registry[self.basis_key](x))

    def extra_repr(self) -> str:
        return f"basis={SHARED_BASES}[{self.basis_key!r}]"


def shared_bases(model: nn.Module) -> nn.ModuleDict:
    """The model's registry of shared bases, created on first use."""
    registry = getattr(model, SHARED_BASES, None)
    if registry is None:
        registry = nn.ModuleDict()
        setattr(model, SHARED_BASES, registry)
    return registry
