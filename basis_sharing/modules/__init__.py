"""Drop-in compressed projections (surgery at the leaf, docs/architecture.md §5.3).

A compressed projection computes y = (x B) C (+ bias): B (d_in x k) is the basis, C (k x d_out) the
coefficients. Both are plain ``nn.Linear`` children (weights B^T and C^T), so PEFT, optimisers and
safetensors see ordinary tensors. A basis shared by a group of layers is registered exactly once,
in the model-level ``ModuleDict`` ``model.shared_bases`` (key ``"<kind>_g<group>"``).

FiPS's ``SparseFactorLinear`` keeps a dense basis U shared by a block group in the same registry
and a sparse per-matrix factor V (values plus a bitmask).

Each type (``LowRankLinear``, ``SharedBasisLinear``, ``SparseFactorLinear``, and any
``CompressedLinear`` subclass given to ``register_module_type``) reports its own shape, kept
parameters, break-even rank and ``compression.json`` entry, and rebuilds itself from that entry;
nothing outside this package tests their classes.
"""

from __future__ import annotations

from basis_sharing.modules.base import (
    CompressedLinear,
    LayoutError,
    break_even_rank,
    compressed_modules,
    count_kept,
    is_compressed,
)
from basis_sharing.modules.factors import basis_linear, coefficient_linear
from basis_sharing.modules.low_rank import LowRankLinear
from basis_sharing.modules.registry import MODULE_TYPES, module_type, register_module_type
from basis_sharing.modules.shared_basis import SHARED_BASES, SharedBasisLinear, shared_bases
from basis_sharing.modules.sparse_factor import SparseFactorLinear
from basis_sharing.modules.surgery import get_leaf, install_factors, replace_leaf

__all__ = [
    "MODULE_TYPES",
    "SHARED_BASES",
    "CompressedLinear",
    "LayoutError",
    "LowRankLinear",
    "SharedBasisLinear",
    "SparseFactorLinear",
    "basis_linear",
    "break_even_rank",
    "coefficient_linear",
    "compressed_modules",
    "count_kept",
    "get_leaf",
    "install_factors",
    "is_compressed",
    "module_type",
    "register_module_type",
    "replace_leaf",
    "shared_bases",
]
