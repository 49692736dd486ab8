"""The two plain ``nn.Linear`` factors of y = (x B) C (+ bias) built from B and C."""

from __future__ import annotations

import torch
from torch import nn


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


def meta_linear(d_in: int, d_out: int, bias: bool, dtype: torch.dtype | None) -> nn.Linear:
    """An empty nn.Linear(d_in -> d_out) on the meta device, for a module rebuilt from a layout."""
    return nn.Linear(d_in, d_out, bias=bias, device=torch.device("meta"), dtype=dtype)
