"""Basis Sharing (Wang et al., ICLR 2025) and SVD-LLM's whitened truncation as its n = 1 case.

For every projection kind, consecutive layers form groups; each group's weights W_G = [W_1|...|W_n]
are whitened by the Cholesky factor of the group's summed input Gram and truncated by SVD into one
shared basis and per-layer coefficients (method-spec.md 1.4-1.6). Private kinds are groups of one
layer, which is exactly SVD-LLM (whitening + truncation); ``svd_llm`` is this class with every kind
private.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.calibration.grams import GramStats
from basis_sharing.linalg.factorization import SharedDecomposition, decompose_shared
from basis_sharing.linalg.whitening import whitening_factor
from basis_sharing.methods.plan import GroupPlan, plan_groups, planned_params, resolve_kinds
from basis_sharing.methods.registry import CompressionContext, CompressionMethod, register_method
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import (
    LowRankLinear,
    SharedBasisLinear,
    basis_linear,
    coefficient_linear,
    shared_bases,
)

log = logging.getLogger(__name__)


class DecompositionCache:
    """Ratio-independent SVDs kept in memory (on the CPU) across the jobs of one process.

    A ratio sweep run by Hydra's basic launcher shares the process, so each group is whitened
    and decomposed once and only truncated per ratio. Least recently used entries are dropped
    beyond ``budget_mb``.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, SharedDecomposition] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self, key: tuple, compute: Callable[[], SharedDecomposition], budget_mb: float
    ) -> SharedDecomposition:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        if budget_mb > 0:
            self._entries[key] = value.to("cpu")
            while sum(v.nbytes() for v in self._entries.values()) > budget_mb * 2**20:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


DECOMPOSITIONS = DecompositionCache()


@register_method("basis_sharing")
class BasisSharing(CompressionMethod):
    needs_calibration = True

    def group_size(self) -> int:
        return self.cfg.group_size

    def kinds(self, family: FamilyAdapter) -> tuple[tuple[str, ...], tuple[str, ...]]:
        shared, private = self.cfg.get("shared"), self.cfg.get("private")
        return resolve_kinds(
            family,
            list(shared) if shared is not None else None,
            list(private) if private is not None else None,
        )

    def plan(self, model: nn.Module, family: FamilyAdapter, ratio: float) -> list[GroupPlan]:
        shared, private = self.kinds(family)
        remainder = self.cfg.get("remainder_rank", "nominal")
        return plan_groups(model, family, ratio, self.group_size(), shared, private, remainder)

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        plans = self.plan(model, family, ctx.ratio)
        return self.apply(model, family, ctx.stats, plans, ctx.device, ctx.extras.get("stats_key"))

    def apply(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        stats: GramStats,
        plans: list[GroupPlan],
        device: torch.device,
        stats_key: str | None = None,
    ) -> dict:
        """Whiten, decompose and truncate every group of ``plans``; replace the projections."""
        layers = family.layers(model)
        fallbacks: list[dict] = []
        factors = []
        for plan in tqdm(plans, desc="decompose", unit="group", leave=False):
            dec = self._decomposition(layers, family, stats, plan, device, stats_key)
            if dec.shift:
                fallbacks.append(
                    {"kind": plan.kind, "layers": list(plan.layers), "shift": dec.shift}
                )
            factors.append((plan, dec.truncate(plan.rank)))
        # Surgery only after every decomposition: each one reads the original weights.
        for plan, (basis, coefficients) in factors:
            self._install(model, layers, family, plan, basis, coefficients)
        shared, private = self.kinds(family)
        return {
            "group_size": self.group_size(),
            "shared_kinds": list(shared),
            "private_kinds": list(private),
            "groups": [p.as_dict() for p in plans],
            "planned_params": planned_params(plans),
            "whitening_fallbacks": len(fallbacks),
            "whitening_fallback_groups": fallbacks,
        }

    def _decomposition(self, layers, family, stats, plan, device, stats_key):
        """The group's SVD; reused from the in-process cache when the statistics are keyed."""
        input_name = family.projection(plan.kind).input

        def compute() -> SharedDecomposition:
            gram = stats.group_gram(plan.layers, input_name).to(device)
            whitening = whitening_factor(gram, eps=self.cfg.eps)
            weights = [family.weight(layers[i], plan.kind).detach().to(device) for i in plan.layers]
            return decompose_shared(weights, whitening.S, whitening.shift)

        if stats_key is None:
            return compute()
        key = (stats_key, plan.kind, plan.layers, self.cfg.eps)
        return DECOMPOSITIONS.get(key, compute, self.cfg.decomposition_cache_mb).to(device)

    @staticmethod
    def _install(model, layers, family, plan, basis, coefficients) -> None:
        reference = family.module(layers[plan.layers[0]], plan.kind)
        dtype = reference.weight.dtype
        if plan.shared:
            registry = shared_bases(model)
            key = f"{plan.kind}_g{plan.index}"
            registry[key] = basis_linear(basis, dtype)
        for member, coefficient in zip(plan.layers, coefficients, strict=True):
            bias = family.bias(layers[member], plan.kind)
            coeff = coefficient_linear(coefficient, bias, dtype)
            if plan.shared:
                new: nn.Module = SharedBasisLinear(registry, key, coeff)
            else:
                new = LowRankLinear(basis_linear(basis, dtype), coeff)
            family.set_module(layers[member], plan.kind, new)


@register_method("svd_llm")
class SVDLLM(BasisSharing):
    """SVD-LLM's whitening + truncation: Basis Sharing with one layer per group for every kind."""

    def group_size(self) -> int:
        return 1

    def kinds(self, family: FamilyAdapter) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (), family.kinds
