"""Surgery at the leaf: compressed modules take the place of dense projection leaves.

Only leaves are replaced (``q_proj``, ``fc1``, ``c_attn``...), never the attention or MLP classes
around them, so the model keeps working across transformers releases. Paths are dotted attribute
paths below an owner module, digits indexing a ``ModuleList`` (``"self_attn.q_proj"``,
``"model.layers.3.mlp.up_proj"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from basis_sharing.modules.base import CompressedLinear
from basis_sharing.modules.factors import basis_linear, coefficient_linear
from basis_sharing.modules.low_rank import LowRankLinear
from basis_sharing.modules.shared_basis import SharedBasisLinear, shared_bases


def get_leaf(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` below ``root``."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def replace_leaf(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` below ``root``; returns the module it replaced."""
    parent_path, _, attr = path.rpartition(".")
    parent = get_leaf(root, parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def install_factors(
    model: nn.Module,
    leaves: Sequence[tuple[nn.Module, str]],
    basis: torch.Tensor,
    coefficients: Sequence[torch.Tensor],
    shared_key: str | None = None,
) -> list[CompressedLinear]:
    """Replace each dense leaf by (x B) C_j (+ its own bias), in the first leaf's dtype and on its
    device (a model kept on the CPU by runtime=sequential stays there).

    Args:
        leaves: (owner, path) of each member's dense projection, e.g. (decoder layer, "mlp.fc1").
        basis: B (d_in, k). With ``shared_key`` it is registered once as
            ``model.shared_bases[shared_key]`` and every member references it; without, each
            member gets its own copy (a group of one, or private per-layer factors).
        coefficients: C_j (k, d_out), one per leaf.
    Returns:
        The installed modules, in the order of ``leaves``.
    """
    first = get_leaf(*leaves[0]).weight
    dtype, device = first.dtype, first.device
    basis, coefficients = basis.to(device), [c.to(device) for c in coefficients]
    registry = None
    if shared_key is not None:
        registry = shared_bases(model)
        registry[shared_key] = basis_linear(basis, dtype)
    installed: list[CompressedLinear] = []
    for (owner, path), coefficient in zip(leaves, coefficients, strict=True):
        bias = getattr(get_leaf(owner, path), "bias", None)
        coeff = coefficient_linear(coefficient, bias, dtype)
        if registry is not None:
            new: CompressedLinear = SharedBasisLinear(registry, shared_key, coeff)
        else:
            new = LowRankLinear(basis_linear(basis, dtype), coeff)
        replace_leaf(owner, path, new)
        installed.append(new)
    return installed
