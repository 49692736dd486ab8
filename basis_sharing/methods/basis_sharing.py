"""Basis Sharing (Wang et al., ICLR 2025) and SVD-LLM's whitened truncation as its n = 1 case.

For every projection kind, consecutive layers form groups; each group's weights W_G = [W_1|...|W_n]
are whitened by the Cholesky factor of the group's summed input Gram and truncated by SVD into one
shared basis and per-layer coefficients (docs/methods.md §3.4-§3.6). Private kinds are groups of one
layer, which is exactly SVD-LLM (whitening + truncation); ``svd_llm`` is this class with every kind
private. Both have the optional deviated-input ``update`` (``basis_sharing.methods.update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.whitening import whitening_factor
from basis_sharing.methods.factorized import (
    FactorizedMethod,
    WhitenedSVDMethodConfig,
    check_kinds,
    check_positive,
)
from basis_sharing.methods.plan import REMAINDER_RANKS, GroupPlan, narrow_kinds, resolve_kinds
from basis_sharing.methods.registry import CompressionContext, register_method
from basis_sharing.methods.update import refit_sequential, refit_single_pass
from basis_sharing.models.families import FamilyAdapter


@dataclass
class BasisSharingMethodConfig(WhitenedSVDMethodConfig):
    """Basis Sharing (docs/methods.md §3)."""

    group_size: int = 2  # consecutive layers sharing one basis (every released config uses 2)
    shared: list[str] | None = None  # projection kinds sharing a basis; None = family default
    private: list[str] | None = None  # kinds with one basis per layer; None = family default
    remainder_rank: str = "nominal"  # smaller last group: "nominal" k (paper code) or "own"
    eps: float = 7e-6  # the Basis Sharing code's regulariser (SVD-LLM uses 1e-6)


@dataclass
class SVDLLMMethodConfig(WhitenedSVDMethodConfig):
    """SVD-LLM (docs/methods.md §4): the shared whitening settings (whose eps is SVD-LLM's)."""


@register_method("basis_sharing", schema=BasisSharingMethodConfig)
class BasisSharing(FactorizedMethod):
    label = "Basis Sharing"
    stats_needed = frozenset({"gram"})

    def group_size(self) -> int:
        return self.cfg.group_size

    def check_config(self, family: FamilyAdapter | None) -> None:
        super().check_config(family)
        check_positive("eps", self.cfg.eps)  # eps = 0 leaves a rank-deficient Gram singular
        check_kinds(self.cfg.get("kinds"), family)
        self.check_groups(family)

    def check_groups(self, family: FamilyAdapter | None) -> None:
        """``group_size``, ``remainder_rank`` and the kinds named in ``shared`` / ``private``."""
        if self.cfg.group_size < 1:
            raise ConfigError(f"method.group_size={self.cfg.group_size} must be >= 1.")
        if self.cfg.remainder_rank not in REMAINDER_RANKS:
            raise unknown_choice("method.remainder_rank", self.cfg.remainder_rank, REMAINDER_RANKS)
        if family is not None:  # else the model's own family is checked once its config is read
            for name in list(self.cfg.shared or []) + list(self.cfg.private or []):
                family.projection(name)  # an unknown kind fails here, listing the valid ones

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        n_layers = len(family.layers(model))
        if self.group_size() > n_layers:
            raise ConfigError(
                f"method.group_size={self.group_size()} exceeds the model's {n_layers} decoder "
                f"layers; use method.group_size<={n_layers} (all layers in one group)."
            )
        return super().shape_plan(model, family, ratio)

    def configured_kinds(self) -> tuple[list[str] | None, list[str] | None]:
        """``method.shared`` and ``method.private`` as given (None: not named)."""
        shared, private = self.cfg.get("shared"), self.cfg.get("private")
        return (
            list(shared) if shared is not None else None,
            list(private) if private is not None else None,
        )

    def narrow(self, family: FamilyAdapter, model: nn.Module) -> tuple[str, ...]:
        """The GQA rule's kinds; none when the config names the kinds (explicit lists win)."""
        if self.configured_kinds() != (None, None):
            return ()
        return narrow_kinds(family, model)

    def kinds(
        self, family: FamilyAdapter, model: nn.Module
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return resolve_kinds(
            family, *self.configured_kinds(), self.narrow(family, model), self.cfg.get("kinds")
        )

    def budget_kinds(self, family: FamilyAdapter) -> tuple[str, ...] | None:
        """``method.kinds`` in the family's order (None: every kind, the default)."""
        kinds = self.cfg.get("kinds")
        return None if kinds is None else tuple(k for k in family.kinds if k in kinds)

    def private_by_rule(self, family: FamilyAdapter, model: nn.Module) -> tuple[str, ...]:
        """Kinds the family shares by default that the GQA rule made private for this model."""
        compressed = self.budget_kinds(family) or family.kinds
        return tuple(
            k for k in self.narrow(family, model) if k in family.shared and k in compressed
        )

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        by_rule = self.private_by_rule(family, model)  # from the dense shapes, before surgery
        info = super().compress(model, family, ctx)
        info["private_by_gqa_rule"] = list(by_rule)
        return info

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        """Cholesky factor of the group's summed Gram (docs/methods.md §3.4)."""
        gram = stats["gram"].group_gram(plan.layers, family.projection(plan.kind).input)
        whitening = whitening_factor(gram.to(device), eps=self.cfg.eps)
        return whitening.S, whitening.shift

    def cache_tag(self) -> tuple:
        return ("gram", self.cfg.eps)

    def update(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        plans: list[GroupPlan],
        originals: dict,
        ctx: CompressionContext,
    ) -> dict:
        """The paper's update: one pass of the compressed model, every group refit at once."""
        return refit_single_pass(model, family, plans, originals, ctx, self.cfg.eps)


@register_method("svd_llm", schema=SVDLLMMethodConfig)
class SVDLLM(BasisSharing):
    """SVD-LLM's whitening + truncation: Basis Sharing with one layer per group for every kind.

    Its update is SVD-LLM's own: layer by layer, each layer refit on the inputs produced by the
    already compressed (and refit) earlier layers.
    """

    label = "SVD-LLM"

    def group_size(self) -> int:
        return 1

    def check_groups(self, family: FamilyAdapter | None) -> None:
        pass  # one layer per group and every kind private: no group settings to check

    def kinds(
        self, family: FamilyAdapter, model: nn.Module
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (), self.budget_kinds(family) or family.kinds

    def private_by_rule(self, family: FamilyAdapter, model: nn.Module) -> tuple[str, ...]:
        return ()  # every kind is private by definition, not by the rule

    def update(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        plans: list[GroupPlan],
        originals: dict,
        ctx: CompressionContext,
    ) -> dict:
        return refit_sequential(model, family, plans, originals, ctx, self.cfg.eps)
