"""Basis Sharing (Wang et al., ICLR 2025) and SVD-LLM's whitened truncation as its n = 1 case.

For every projection kind, consecutive layers form groups; each group's weights W_G = [W_1|...|W_n]
are whitened by the Cholesky factor of the group's summed input Gram and truncated by SVD into one
shared basis and per-layer coefficients (docs/methods.md §3.4-§3.6). Private kinds are groups of one
layer, which is exactly SVD-LLM (whitening + truncation); ``svd_llm`` is this class with every kind
private. Both have the optional refits (``update``: ``basis_sharing.methods.update``), and the
choices beyond the papers (docs/methods.md §10): eigen whitening, global rank allocation, and for
Basis Sharing the automatic sharing choice per kind (``shared: auto``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.whitening import whiten
from basis_sharing.methods.allocation import family_gram, global_plans, sharing_errors
from basis_sharing.methods.compensate import refit_compensating
from basis_sharing.methods.factorized import (
    FactorizedMethod,
    WhitenedSVDMethodConfig,
    check_kinds,
    check_positive,
)
from basis_sharing.methods.options import AUTO_CANDIDATES, check_whitened_options
from basis_sharing.methods.plan import (
    REMAINDER_RANKS,
    GroupPlan,
    narrow_kinds,
    plan_groups,
    resolve_kinds,
)
from basis_sharing.methods.registry import CompressionContext, register_method
from basis_sharing.methods.update import BasisRefit, refit_sequential, refit_single_pass
from basis_sharing.models.families import FamilyAdapter


@dataclass
class BasisSharingMethodConfig(WhitenedSVDMethodConfig):
    """Basis Sharing (docs/methods.md §3)."""

    group_size: int = 2  # consecutive layers sharing one basis (every released config uses 2)
    # Projection kinds sharing a basis; None = family default; "auto": per kind, whichever of
    # shared or private has the lower calibration output error (docs/methods.md §10.3).
    shared: Any = None
    private: list[str] | None = None  # kinds with one basis per layer; None = family default
    # shared=auto: the kinds it decides for. all: every compressed kind; rule: only those the
    # family's default shares after the GQA rule (the others stay private, docs/methods.md §10.3).
    auto_candidates: str = "all"
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
        check_whitened_options(self.cfg, self.name)
        self.check_groups(family)

    def auto_sharing(self) -> bool:
        return self.cfg.get("shared") == "auto"

    def check_groups(self, family: FamilyAdapter | None) -> None:
        """``group_size``, ``remainder_rank`` and the kinds named in ``shared`` / ``private``."""
        if self.cfg.group_size < 1:
            raise ConfigError(f"method.group_size={self.cfg.group_size} must be >= 1.")
        if self.cfg.remainder_rank not in REMAINDER_RANKS:
            raise unknown_choice("method.remainder_rank", self.cfg.remainder_rank, REMAINDER_RANKS)
        shared = self.cfg.shared
        if isinstance(shared, str) and shared != "auto":
            raise ConfigError(
                f"method.shared={shared!r}: give a list of projection kinds, null (the family's "
                "default) or auto."
            )
        candidates = self.cfg.get("auto_candidates", "all")
        if candidates not in AUTO_CANDIDATES:
            raise unknown_choice("method.auto_candidates", candidates, AUTO_CANDIDATES)
        if candidates != "all" and not self.auto_sharing():
            raise ConfigError(
                f"method.auto_candidates={candidates} is an option of method.shared=auto "
                f"(got method.shared={self.cfg.shared!r})."
            )
        if self.auto_sharing() and self.cfg.private is not None:
            raise ConfigError(
                "method.shared=auto chooses shared or private for every compressed kind; leave "
                f"method.private unset (got {list(self.cfg.private)})."
            )
        if family is not None:  # else the model's own family is checked once its config is read
            for name in list(self.listed_shared()) + list(self.cfg.private or []):
                family.projection(name)  # an unknown kind fails here, listing the valid ones

    def listed_shared(self) -> list[str]:
        """``method.shared`` when it is a list of kinds, else empty."""
        shared = self.cfg.get("shared")
        return [] if shared is None or isinstance(shared, str) else list(shared)

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        """The plan from shapes: None with ``shared=auto`` (its kinds come from the data); with
        global allocation, the uniform plan (same groups and budget, ranks decided later)."""
        n_layers = len(family.layers(model))
        if self.group_size() > n_layers:
            raise ConfigError(
                f"method.group_size={self.group_size()} exceeds the model's {n_layers} decoder "
                f"layers; use method.group_size<={n_layers} (all layers in one group)."
            )
        if self.auto_sharing():
            return None
        return self.uniform_plan(model, family, ratio)

    def uniform_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        shared, private = self.kinds(family, model)
        remainder = self.cfg.get("remainder_rank", "nominal")
        return plan_groups(model, family, ratio, self.group_size(), shared, private, remainder)

    def plan(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext):
        """The sharing choice (``shared=auto``), then the uniform plan, then global ranks."""
        self.sharing_report = None
        if self.auto_sharing():
            self.choose_sharing(model, family, ctx)
        plans = self.uniform_plan(model, family, ctx.ratio)
        if self.cfg.get("allocation", "uniform") == "global":
            layers = family.layers(model)
            plans = global_plans(
                plans,
                lambda p: self.decomposition(layers, family, p, ctx),
                ctx.ratio,
                self.cfg.allocation_scope,
                bool(self.cfg.allocation_normalize),
                int(self.cfg.min_rank),
            )
        return plans

    def choose_sharing(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext):
        """Per compressed kind, shared groups or one basis per layer: the lower output error."""
        self.chosen_kinds = None
        layers = family.layers(model)
        remainder = self.cfg.get("remainder_rank", "nominal")
        report = []
        candidates = self.auto_candidates(family, model)
        for kind in self.budget_kinds(family) or family.kinds:
            if kind not in candidates:
                report.append({"kind": kind, "choice": "private", "by_rule": True})
                continue
            both = [
                plan_groups(model, family, ctx.ratio, size, shared, private, remainder)
                for size, shared, private in ((self.group_size(), (kind,), ()), (1, (), (kind,)))
            ]
            report.append(
                sharing_errors(
                    kind,
                    *both,
                    lambda p: self.decomposition(layers, family, p, ctx),
                    lambda i, kind=kind: family.weight(layers[i], kind).detach(),
                    family_gram(ctx.stats or {}, family, kind),
                )
            )
        shared = tuple(r["kind"] for r in report if r["choice"] == "shared")
        self.chosen_kinds = (shared, tuple(r["kind"] for r in report if r["kind"] not in shared))
        self.sharing_report = report

    def auto_candidates(self, family: FamilyAdapter, model: nn.Module) -> tuple[str, ...]:
        """The kinds ``shared=auto`` decides for: every kind, or (``auto_candidates=rule``) the
        family's default shared kinds less those the GQA rule makes private."""
        if self.cfg.get("auto_candidates", "all") == "all":
            return tuple(family.kinds)
        narrow = narrow_kinds(family, model)
        return tuple(k for k in family.shared if k not in narrow)

    def configured_kinds(self) -> tuple[list[str] | None, list[str] | None]:
        """``method.shared`` and ``method.private`` as given (None: not named).

        With ``shared=auto`` they are the choice made at compression time, once it is made.
        """
        chosen = getattr(self, "chosen_kinds", None)
        if self.auto_sharing() and chosen is not None:
            return list(chosen[0]), list(chosen[1])
        shared, private = self.cfg.get("shared"), self.cfg.get("private")
        return (
            list(shared) if shared is not None and not isinstance(shared, str) else None,
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
        by_rule = () if self.auto_sharing() else self.private_by_rule(family, model)
        info = super().compress(model, family, ctx)  # before surgery: the rule reads dense shapes
        info["private_by_gqa_rule"] = list(by_rule)
        info["whitening"] = self.whitening_kind()
        info["allocation"] = {
            "mode": self.cfg.get("allocation", "uniform"),
            "scope": self.cfg.get("allocation_scope", "kind"),
            "normalize": bool(self.cfg.get("allocation_normalize", False)),
            "min_rank": int(self.cfg.get("min_rank", 1)),
        }
        if self.auto_sharing():
            info["sharing"] = self.sharing_report
        self.chosen_kinds = self.sharing_report = None  # the next job of a sweep chooses again
        return info

    def scaling(
        self, plan: GroupPlan, family: FamilyAdapter, stats: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, float]:
        """Whitening factor of the group's summed Gram (docs/methods.md §3.4, §10.4)."""
        gram = stats["gram"].group_gram(plan.layers, family.projection(plan.kind).input)
        whitening = whiten(gram.to(device), self.whitening_kind(), eps=self.cfg.eps)
        return whitening.S, whitening.shift

    def whitening_kind(self) -> str:
        return self.cfg.get("whitening", "cholesky")

    def cache_tag(self) -> tuple:
        return ("gram", self.cfg.eps, self.whitening_kind())

    def update(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        plans: list[GroupPlan],
        originals: dict,
        ctx: CompressionContext,
    ) -> dict:
        """The configured refit (``methods.options.UPDATES``); with ``refit_basis`` the
        layer-by-layer ones also refit the bases."""
        mode, eps = self.update_mode(), self.cfg.eps
        if mode == "one_pass":
            return refit_single_pass(model, family, plans, originals, ctx, eps)
        args = (model, family, plans, originals, ctx, eps)
        samples, refit_basis = self.cfg.get("refit_samples"), self.cfg.get("refit_basis", False)
        if mode == "sequential":
            return refit_compensating(*args, refit_basis=refit_basis, samples=samples)
        how = BasisRefit(
            self.whitening_kind(),
            eps,
            self.decomposition_choice(),
            replaces_decomposed=not self.update_derives_every_factor(),
        )
        return refit_sequential(*args, samples=samples, refit_basis=how if refit_basis else None)

    def update_derives_every_factor(self) -> bool:
        """``update=layerwise refit_basis=true``: every group is re-derived at its first member
        and every member refit when its layer is reached, before any later layer runs, so the
        first pass's factors would never be used (docs/methods.md §10.1)."""
        return self.update_mode() == "layerwise" and bool(self.cfg.get("refit_basis", False))


@register_method("svd_llm", schema=SVDLLMMethodConfig)
class SVDLLM(BasisSharing):
    """SVD-LLM's whitening + truncation: Basis Sharing with one layer per group for every kind.

    Its own update (``update: true``) is SVD-LLM's ``layerwise`` refit: layer by layer, each layer
    refit on the inputs produced by the already compressed (and refit) earlier layers.
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
