"""FiPS's projection: a dense basis U shared by a block group and a sparse per-matrix factor V.

The oriented matrix M = U V (d x w, docs/methods.md §9.1) is W itself for up and gate
(y = x U V) and W^T for down (y = x V^T U^T). U (d x r) lives once in the model-level registry
``model.shared_bases`` as an ``nn.Linear(d -> r)`` (weight U^T); V is stored sparse: its kept
entries in row-major order (``values``, a parameter) and a bitmask of where they sit
(``mask_bits``, a uint8 buffer of ceil(r w / 8) bytes), so a state dict, a safetensors file and
the parameter count all see the nonzeros only. The forward computes x U first and then the
masked V (or x V^T, then U^T); with ``method.structure=2:4`` on a GPU, V can run as a
semi-structured sparse matrix (``to_semi_structured``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from basis_sharing.linalg.pruning import STRUCTURES
from basis_sharing.modules.base import CompressedLinear, count_new
from basis_sharing.modules.factors import meta_linear
from basis_sharing.modules.registry import register_module_type
from basis_sharing.modules.shared_basis import SHARED_BASES, check_registered, shared_bases


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8 bytes, entry i in bit i % 8 of byte i // 8 (row-major order)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the (rows, cols) boolean mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).flatten()[: rows * cols]
    return flat.to(torch.bool).view(rows, cols)


def mask_bytes(rows: int, cols: int) -> int:
    return -(-rows * cols // 8)


@register_module_type
class SparseFactorLinear(CompressedLinear):
    """y = x (U V) + b (up, gate) or y = x (U V)^T + b (down, ``transposed``); U shared, V sparse.

    Kept weights: V's nonzeros for the member, plus d r for U the first time it is counted.
    """

    layout_type = "fips"
    entry_keys = (
        *CompressedLinear.entry_keys,
        "basis_key",
        "transposed",
        "nnz",
        "structure",
    )

    def __init__(
        self,
        registry: nn.ModuleDict,
        basis_key: str,
        values: torch.Tensor,
        mask_bits: torch.Tensor,
        width: int,
        transposed: bool,
        bias: torch.Tensor | None = None,
        structure: str = "none",
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_registry", registry)  # not a child: counted and saved once
        self.basis_key = basis_key
        self.width = width
        self.transposed = transposed
        self.structure = structure
        self.values = nn.Parameter(values)
        self.register_buffer("mask_bits", mask_bits)
        self.bias = None if bias is None else nn.Parameter(bias)
        self._sparse: torch.Tensor | None = None  # semi-structured V, see to_semi_structured

    @classmethod
    def from_dense(
        cls,
        registry: nn.ModuleDict,
        basis_key: str,
        v: torch.Tensor,
        mask: torch.Tensor,
        transposed: bool,
        bias: torch.Tensor | None = None,
        structure: str = "none",
    ) -> SparseFactorLinear:
        """From V (r, w) and its boolean mask: the masked entries are dropped."""
        return cls(
            registry,
            basis_key,
            v.detach()[mask].clone(),
            pack_bits(mask),
            v.shape[1],
            transposed,
            None if bias is None else bias.detach().clone(),
            structure,
        )

    # ---- the factors ---------------------------------------------------------------------
    @property
    def basis(self) -> nn.Linear:
        """U as ``nn.Linear(d -> r)`` (weight U^T), shared by the group."""
        return self._registry[self.basis_key]

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.mask_bits, self.rank, self.width)

    def dense_v(self) -> torch.Tensor:
        """V (r, w) with zeros where the mask is off (differentiable in ``values``)."""
        mask = self.mask()
        return self.values.new_zeros(mask.shape).masked_scatter(mask, self.values)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    # ---- shape ---------------------------------------------------------------------------
    @property
    def shared_basis_key(self) -> None:
        return None  # U is not an adapter target: down reads it transposed (adapter_slots)

    @property
    def rank(self) -> int:
        return self.basis.out_features

    @property
    def d_model(self) -> int:
        return self.basis.in_features

    @property
    def d_in(self) -> int:
        return self.width if self.transposed else self.d_model

    @property
    def d_out(self) -> int:
        return self.d_model if self.transposed else self.width

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    # ---- accounting ----------------------------------------------------------------------
    def factor_weights(self) -> list[torch.Tensor]:
        return [self.basis.weight, self.values]

    def storage_bytes(self, seen: set[int]) -> int:
        """Bytes it stores not counted yet: V's values and bitmask, U the first time."""
        u = self.basis.weight
        u_bytes = 0 if id(u) in seen else u.numel() * u.element_size()
        count_new([u], seen)
        return u_bytes + self.nnz * self.values.element_size() + self.mask_bits.numel()

    # ---- compute -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # down: x (.., w) -> x V^T (.., r) -> (x V^T) U^T (.., d)
            h = F.linear(x, self._sparse if self._sparse is not None else self.dense_v())
            y = F.linear(h, self.basis.weight.T)
        else:  # up / gate: x (.., d) -> x U (.., r) -> (x U) V (.., w)
            h = self.basis(x)
            weight = self._sparse if self._sparse is not None else self.dense_v().T
            y = F.linear(h, weight)
        return y if self.bias is None else y + self.bias

    def to_semi_structured(self) -> None:
        """Run V as a 2:4 semi-structured sparse matrix (CUDA, float16 / bfloat16 only).

        The mask must be 2:4 along V's input side (``method.structure=2:4`` prunes it so). The
        sparse copy is for evaluation: later changes to ``values`` do not reach it.
        """
        from torch.sparse import to_sparse_semi_structured

        if self.structure != "2:4":
            raise ValueError(f"V was pruned with structure {self.structure!r}, not 2:4")
        v = self.dense_v().detach()
        weight = v if self.transposed else v.T  # F.linear's weight: (out, in), 2:4 along in
        self._sparse = to_sparse_semi_structured(weight.contiguous())

    def extra_repr(self) -> str:
        return (
            f"basis={SHARED_BASES}[{self.basis_key!r}], width={self.width}, "
            f"nnz={self.nnz}, transposed={self.transposed}, structure={self.structure!r}"
        )

    # ---- saved layout --------------------------------------------------------------------
    def layout_entry(self, layer: int, kind: str, root: nn.Module) -> dict[str, Any]:
        check_registered(self._registry, self.basis_key, root, layer, kind)
        return {
            **super().layout_entry(layer, kind, root),
            "basis_key": self.basis_key,
            "transposed": self.transposed,
            "nnz": self.nnz,
            "structure": self.structure,
        }

    @classmethod
    def value_problems(cls, entry: dict[str, Any]) -> list[str]:
        problems = super().value_problems(entry)
        if not (isinstance(entry["basis_key"], str) and entry["basis_key"]):
            problems.append(f"a fips entry needs a basis_key, got {entry['basis_key']!r}")
        if not isinstance(entry["transposed"], bool):
            problems.append(f"'transposed' must be true or false, got {entry['transposed']!r}")
        if entry["structure"] not in STRUCTURES:
            problems.append(f"'structure' must be one of {STRUCTURES}, got {entry['structure']!r}")
        nnz = entry["nnz"]
        if not problems:
            width = entry["d_in"] if entry["transposed"] else entry["d_out"]
            if not (isinstance(nnz, int) and not isinstance(nnz, bool)):
                problems.append(f"'nnz' must be an integer, got {nnz!r}")
            elif not 0 <= nnz <= entry["rank"] * width:
                problems.append(f"'nnz'={nnz} is outside [0, rank x width]")
        return problems

    @classmethod
    def registry_shapes(cls, entry: dict[str, Any]) -> dict[str, tuple[int, int]]:
        d = entry["d_out"] if entry["transposed"] else entry["d_in"]
        return {entry["basis_key"]: (d, entry["rank"])}

    @classmethod
    def from_layout(
        cls, entry: dict[str, Any], root: nn.Module, dtype: torch.dtype | None = None
    ) -> SparseFactorLinear:
        transposed, rank = entry["transposed"], entry["rank"]
        d, width = (
            (entry["d_out"], entry["d_in"]) if transposed else (entry["d_in"], entry["d_out"])
        )
        registry = shared_bases(root)
        key = entry["basis_key"]
        if key not in registry:
            registry[key] = meta_linear(d, rank, False, dtype)
        meta = torch.device("meta")
        values = torch.empty(entry["nnz"], device=meta, dtype=dtype)
        bits = torch.empty(mask_bytes(rank, width), device=meta, dtype=torch.uint8)
        bias = torch.empty(entry["d_out"], device=meta, dtype=dtype) if entry["bias"] else None
        return cls(registry, key, values, bits, width, transposed, bias, entry["structure"])
