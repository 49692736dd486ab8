"""What every compressed projection type says about itself.

A compressed projection replaces one ``nn.Linear`` / ``Conv1D`` leaf of a decoder layer and
computes y = x W~ (+ bias) with fewer weights. Its type owns the facts the rest of the package
needs, so saving, loading, parameter accounting and the throughput check ask the module instead
of testing its class:

- ``rank``, ``d_in``, ``d_out``, ``has_bias``: its shape;
- ``factor_weights()``: the weight tensors it computes with (biases excluded, shared ones
  included), from which ``kept_parameters(seen)`` counts a tensor shared by several layers once;
- ``break_even_rank()``: the rank above which it costs more multiply-adds than the dense layer;
- ``layout_entry(layer, kind, root)`` / ``from_layout(entry, root, dtype)``: its entry in
  ``compression.json`` and the empty (meta-device) module rebuilt from that entry;
- ``entry_problems(entry)`` / ``registry_shapes(entry)``: what a well-formed entry holds, and
  which bases of the model-level registry (``root.shared_bases``) it uses.

A type is found by its ``layout_type`` string through ``basis_sharing.modules.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from basis_sharing.errors import UserError


class LayoutError(UserError):
    """A compressed module cannot be described by a layout entry (so it could not be rebuilt)."""


def break_even_rank(d_in: int, d_out: int) -> float:
    """Rank k* at which (x B) C, k (d_in + d_out) multiply-adds a token, costs as much as x W."""
    return d_in * d_out / (d_in + d_out)


def count_new(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Elements of the tensors whose id is not in ``seen`` yet; their ids are added to it."""
    total = 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


class CompressedLinear(nn.Module, ABC):
    """Base of every compressed projection type (see the module docstring for the contract).

    Attributes:
        layout_type: the ``"type"`` string of its ``compression.json`` entries.
        entry_keys: the keys its entries hold besides ``layer``, ``kind`` and ``type``.
    """

    layout_type: ClassVar[str]
    entry_keys: ClassVar[tuple[str, ...]] = ("rank", "d_in", "d_out", "bias")

    # ---- shape ---------------------------------------------------------------------------
    @property
    def shared_basis_key(self) -> str | None:
        """The ``model.shared_bases`` key of the basis this module shares with its group; None
        when it keeps its factors to itself (what fine-tuners ask instead of the type)."""
        return None

    def adapter_slots(self) -> tuple[tuple[str, str], ...]:
        """(child name, role) of each plain ``nn.Linear`` child an adapter (LoRA) can sit on.

        Roles: ``coefficient`` (per layer) and ``private_basis``; a shared basis is offered once,
        through ``shared_basis_key``. Default: none.
        """
        return ()

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def d_in(self) -> int: ...

    @property
    @abstractmethod
    def d_out(self) -> int: ...

    @property
    @abstractmethod
    def has_bias(self) -> bool: ...

    # ---- accounting ----------------------------------------------------------------------
    @abstractmethod
    def factor_weights(self) -> list[torch.Tensor]:
        """The weight tensors it computes with: biases excluded, a shared basis included."""

    def kept_parameters(self, seen: set[int]) -> int:
        """Weights not counted yet: ``seen`` holds the ids of tensors already counted.

        Passing one ``seen`` over every projection of a model counts a shared basis once.
        """
        return count_new(self.factor_weights(), seen)

    def break_even_rank(self) -> float:
        """Above this rank it is slower than the dense layer (two factors: k (d_in + d_out))."""
        return break_even_rank(self.d_in, self.d_out)

    # ---- saved layout --------------------------------------------------------------------
    def layout_entry(self, layer: int, kind: str, root: nn.Module) -> dict[str, Any]:
        """Its ``compression.json`` entry; ``root`` is the model (owner of ``shared_bases``).

        Raises:
            LayoutError: it could not be rebuilt from the entry (e.g. a basis outside the
                model's registry).
        """
        return {
            "layer": layer,
            "kind": kind,
            "type": self.layout_type,
            "rank": self.rank,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "bias": self.has_bias,
        }

    @classmethod
    def entry_problems(cls, entry: dict[str, Any]) -> list[str]:
        """What is wrong with the type's own keys of ``entry`` (empty when well formed)."""
        missing = [k for k in cls.entry_keys if k not in entry]
        if missing:
            return [f"lacks the key(s) {missing}"]
        return cls.value_problems(entry)

    @classmethod
    def value_problems(cls, entry: dict[str, Any]) -> list[str]:
        """The values of an entry holding every key of ``entry_keys``; subclasses extend it."""
        problems = []
        for key, minimum in (("rank", 1), ("d_in", 1), ("d_out", 1)):
            value = entry[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                problems.append(f"'{key}' must be an integer >= {minimum}, got {value!r}")
        if not isinstance(entry["bias"], bool):
            problems.append(f"'bias' must be true or false, got {entry['bias']!r}")
        return problems

    @classmethod
    def registry_shapes(cls, entry: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """(d_in, rank) of each basis of ``root.shared_bases`` a well-formed entry uses."""
        return {}

    @classmethod
    @abstractmethod
    def from_layout(
        cls, entry: dict[str, Any], root: nn.Module, dtype: torch.dtype | None = None
    ) -> CompressedLinear:
        """An empty module of the entry's shapes on the meta device (weights are assigned later).

        Bases it shares are created in ``root.shared_bases`` by the first entry that uses them.
        """


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedLinear)


def compressed_modules(model: nn.Module) -> list[tuple[str, CompressedLinear]]:
    """(qualified name, module) of every compressed projection in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CompressedLinear)]


def count_kept(module: nn.Module, seen: set[int]) -> int:
    """Weights of a projection leaf (compressed or dense) or registry not yet in ``seen``.

    A compressed module answers itself; any other module counts its parameters except biases.
    """
    if isinstance(module, CompressedLinear):
        return module.kept_parameters(seen)
    weights = [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] != "bias"]
    return count_new(weights, seen)


class TwoFactorLinear(CompressedLinear):
    """y = coefficient(basis(x)): a basis (d_in -> k) and a per-layer coefficient (k -> d_out).

    Subclasses say where ``basis`` lives (a child of their own, or a registry entry shared by a
    group) and how their layout entry describes it; the shape, the weights and the product are
    the same for both.
    """

    basis: nn.Module
    coefficient: nn.Linear

    def adapter_slots(self) -> tuple[tuple[str, str], ...]:
        slots = (("coefficient", "coefficient"),)
        if self.shared_basis_key is None and isinstance(self.basis, nn.Module):
            slots += (("basis", "private_basis"),)
        return slots

    @property
    def rank(self) -> int:
        return self.coefficient.in_features

    @property
    def d_in(self) -> int:
        return self.basis.in_features

    @property
    def d_out(self) -> int:
        return self.coefficient.out_features

    @property
    def has_bias(self) -> bool:
        return self.coefficient.bias is not None

    def factor_weights(self) -> list[torch.Tensor]:
        return [self.basis.weight, self.coefficient.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient(self.basis(x))
