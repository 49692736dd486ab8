"""The machinery every SVD-family method shares (docs/methods.md §5.1).

A factorised method replaces each group of projections (one layer, or a group of consecutive
layers sharing a basis) by a truncated factorisation of S W_G, where S is the method's input
scaling: the identity (SVD), a diagonal (FWSVD's Fisher rows, ASVD's activation scales) or the
Cholesky factor of the calibration Gram (SVD-LLM, Basis Sharing). The basis B = S^{-1} U_k Sigma_k
and coefficients C_j = V_k^T slices are installed as drop-in modules (``basis_sharing.modules``).

A method file only says what is specific to it: its settings, which statistics it needs, its
scaling, its rank plan, and an optional refit (``update``). The settings every factorised method
has (``FactorizedMethodConfig``) and those of the two whitening methods
(``WhitenedSVDMethodConfig``) are declared here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.factorization import (
    DECOMPOSITIONS,
    Decomposition,
    decompose_shared,
)
from basis_sharing.methods.options import update_mode
from basis_sharing.methods.plan import GroupPlan, plan_groups, planned_params
from basis_sharing.methods.registry import CompressionContext, CompressionMethod, MethodConfig
from basis_sharing.models.families import FamilyAdapter, dense_projection_weights
from basis_sharing.modules import install_factors

log = logging.getLogger(__name__)


@dataclass
class FactorizedMethodConfig(MethodConfig):
    """Settings every SVD-family method has."""

    decomposition_cache_mb: float = 4096  # in-process SVD reuse across a sweep; 0 disables
    # How each group's S W_G is factorised (docs/methods.md §5.1): svd (the thin SVD, the
    # reference), gram_eigh (eigh of its smaller Gram, only the kept vectors formed) or auto
    # (gram_eigh when one side is at least 1.5x the other).
    decomposition: str = "svd"


@dataclass
class WhitenedSVDMethodConfig(FactorizedMethodConfig):
    """Shared by every method that whitens with the calibration Gram (svd_llm, basis_sharing).

    The defaults are the papers' procedure; the other choices are docs/methods.md §10.
    """

    eps: float = 1e-6  # added to -lambda_min when a Gram is not positive definite
    # Refit of the coefficients after the truncation (``methods.options.UPDATES``): none,
    # one_pass (Basis Sharing's), layerwise (SVD-LLM's), sequential (to the original outputs,
    # docs/methods.md §10.1). true / false: the method's own / none.
    update: Any = False
    # sequential: also refit each shared basis (alternating LS); layerwise: re-derive each basis
    # at its first member on the deviated Gram
    refit_basis: bool = False
    refit_samples: int | None = None  # sequential, layerwise: the first N calibration samples
    whitening: str = "cholesky"  # or eigh (SVD-LLM V2: clamped eigenvalues)
    # Ranks: uniform (the papers' rule per group) or global (largest whitened energy per
    # parameter, docs/methods.md §10.2), within each kind or across all kinds (allocation_scope).
    allocation: str = "uniform"
    allocation_scope: str = "kind"  # or all
    allocation_normalize: bool = False  # global: each group's energies divided by its total
    min_rank: int = 1  # global: the smallest rank a group may get
    # Projection kinds to compress (None: every kind). The others stay dense, and ``ratio`` is
    # the fraction removed from the named kinds' weights (e.g. [up, gate, down]: the MLP only).
    kinds: list[str] | None = None


def check_positive(key: str, value: float) -> None:
    """Refuse ``method.<key>`` unless it is a finite number > 0 (NaN and inf included)."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"method.{key}={value} must be a finite number > 0.")


class FactorizedMethod(CompressionMethod):
    """Truncated factorisation of every projection group of S W_G (see module docstring)."""

    stats_needed: ClassVar[frozenset[str]] = frozenset()  # "gram", "scale", "fisher"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return bool(self.stats_needed) or self.update_mode() != "none"

    def update_mode(self) -> str:
        """The configured refit (``methods.update.UPDATES``); "none" for methods without one."""
        return update_mode(self.name, self.cfg.get("update", False))

    def whitening_kind(self) -> str:
        """How S is inverted: ``cholesky`` (S upper triangular, also every diagonal S) or eigh."""
        return "cholesky"

    # ---- what a method specialises -------------------------------------------------------
    def group_size(self) -> int:
        return 1

    def kinds(
        self, family: FamilyAdapter, model: nn.Module
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(shared kinds, private kinds); ``model`` gives the shapes (dense, or on meta)."""
        return (), family.kinds

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        """S (d_in, d_in) upper triangular in float64 on ``device``, and any diagonal shift."""
        raise NotImplementedError

    def cache_tag(self) -> tuple:
        """Settings besides the statistics that change the decomposition (part of its key)."""
        return ()

    def check_config(self, family: FamilyAdapter | None) -> None:
        budget = self.cfg.decomposition_cache_mb
        if not budget >= 0:  # `not >=` also refuses NaN; inf is a budget without a limit
            raise ConfigError(f"method.decomposition_cache_mb={budget} must be >= 0 (0 disables).")
        if self.decomposition_choice() not in DECOMPOSITIONS:
            raise unknown_choice(
                "method.decomposition", self.decomposition_choice(), DECOMPOSITIONS
            )

    def decomposition_choice(self) -> str:
        return self.cfg.get("decomposition", "svd")

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        return self.plan(model, family, CompressionContext(ratio=ratio, device=torch.device("cpu")))

    def plan(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext):
        shared, private = self.kinds(family, model)
        remainder = self.cfg.get("remainder_rank", "nominal")
        return plan_groups(model, family, ctx.ratio, self.group_size(), shared, private, remainder)

    def update(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        plans: list[GroupPlan],
        originals: dict,
        ctx: CompressionContext,
    ) -> dict:
        raise NotImplementedError(f"method {self.name} has no update step")

    def update_derives_every_factor(self) -> bool:
        """Whether the update replaces every factor before any is used, so the first pass
        need only install the planned shapes (``apply(..., decompose=False)``)."""
        return False

    # ---- the shared procedure ------------------------------------------------------------
    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        plans = self.plan(model, family, ctx)
        updating = self.update_mode() != "none"
        originals = snapshot_weights(model, family) if updating else {}
        decompose = not (updating and self.update_derives_every_factor())
        info = self.apply(model, family, plans, ctx, decompose)
        if originals:
            info["update"] = self.update(model, family, plans, originals, ctx)
        return info

    def apply(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        plans: list[GroupPlan],
        ctx: CompressionContext,
        decompose: bool = True,
    ) -> dict:
        """Scale, decompose and truncate every group of ``plans``; replace the projections.

        ``decompose=False`` (an update that derives every factor itself): each group gets
        placeholder factors of its planned rank instead (the same modules and parameter count, no
        decomposition computed): seeded random ones at a layer's scale, not zeros, because the
        attention replay's exactness check runs o before its refit (``runtime/replay.py``), and
        against a zero o it would pass for any attention.
        """
        layers = family.layers(model)
        dense_total = dense_projection_weights(model, family)
        shared, private = self.kinds(family, model)  # before surgery: it may read the shapes
        fallbacks: list[dict] = []
        seed = torch.Generator().manual_seed(0)
        for plan in tqdm(plans, desc=f"{self.name}: decompose", unit="group", leave=False):
            if not decompose:
                install(model, layers, family, plan, *placeholder_factors(plan, seed))
                continue
            dec = self.decomposition(layers, family, plan, ctx)
            if dec.shift:
                fallbacks.append(
                    {"kind": plan.kind, "layers": list(plan.layers), "shift": dec.shift}
                )
            # Installing at once is safe (a group reads only its own members' weights) and frees
            # the dense weights as it goes: holding every factor until the end needs the whole
            # compressed model again in float64 (a LLaMA-7B ran out of 80 GB that way).
            install(model, layers, family, plan, *dec.truncate(plan.rank))
            del dec
        return {
            "group_size": self.group_size(),
            "shared_kinds": list(shared),
            "private_kinds": list(private),
            "groups": [p.as_dict() for p in plans],
            "planned_params": planned_params(plans, dense_total),
            "whitening_fallbacks": len(fallbacks),
            "whitening_fallback_groups": fallbacks,
            "first_pass_decomposed": decompose,
        }

    def decomposition(self, layers, family, plan: GroupPlan, ctx: CompressionContext):
        """The group's SVD; reused from the sweep's caches when the run has them and a key."""
        device = ctx.device

        def compute() -> Decomposition:
            S, shift = self.scaling(plan, family, ctx.stats or {}, device)
            weights = [family.weight(layers[i], plan.kind).detach().to(device) for i in plan.layers]
            return decompose_shared(
                weights, S, shift, self.whitening_kind(), self.decomposition_choice()
            )

        run_key = ctx.stats_key
        if run_key is None or ctx.caches is None:
            return compute()
        tag = (*self.cache_tag(), self.decomposition_choice())
        key = (run_key, self.name, tag, plan.kind, plan.layers)
        budget = self.cfg.get("decomposition_cache_mb", 0)
        return ctx.caches.decompositions.get(key, compute, budget).to(device)


def placeholder_factors(
    plan: GroupPlan, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random B (d_in, k) and C_j (k, d_out) with x B C_j about as large as x."""
    basis = torch.randn(plan.d_in, plan.rank, generator=generator) / plan.d_in**0.5
    coefficients = [
        torch.randn(plan.rank, plan.d_out, generator=generator) / plan.rank**0.5
        for _ in plan.layers
    ]
    return basis, coefficients


def install(model, layers, family, plan: GroupPlan, basis, coefficients) -> None:
    """Replace the projections of ``plan``'s layers by the factorised modules.

    A shared group's basis is registered as ``model.shared_bases[plan.basis_key]``.
    """
    path = family.projection(plan.kind).path
    leaves = [(layers[member], path) for member in plan.layers]
    install_factors(model, leaves, basis, coefficients, shared_key=plan.basis_key)


def snapshot_weights(
    model: nn.Module, family: FamilyAdapter
) -> dict[tuple[int, str], torch.Tensor]:
    """Copies of every projection's W (d_in, d_out) on the CPU, for a later refit."""
    return {
        (i, kind): family.weight(layer, kind).detach().to("cpu", copy=True)
        for i, layer in enumerate(family.layers(model))
        for kind in family.kinds
    }


def current_basis(module: nn.Module) -> torch.Tensor:
    """B (d_in, k) of a compressed projection."""
    return module.basis.weight.detach().T


def check_kinds(kinds: list[str] | None, family: FamilyAdapter | None) -> None:
    """``method.kinds``: None, or a non-empty list of distinct kinds of the family."""
    if kinds is None:
        return
    if not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(
            f"method.kinds={list(kinds)} must name each projection kind to compress once "
            "(null: every kind)."
        )
    if family is not None:
        for kind in kinds:
            family.projection(kind)  # an unknown kind fails here, listing the valid ones
