"""Data-dependent plans of the whitened SVD methods: global ranks and the sharing choice.

Both read the groups' whitened spectra, so they run at compression time (after calibration); the
decompositions they need are the ones the truncation uses, taken through the sweep's caches.

- ``global_plans`` (docs/methods.md §10.2): the uniform plan's groups with ranks from
  ``linalg.allocation.allocate_ranks``, under the same weight budget per kind (or over all kinds).
- ``sharing_errors`` (docs/methods.md §10.3): for one projection kind, the calibration output
  error sum_j ||X_j (W_j - B C_j)||_F^2 of sharing a basis in groups and of one basis per layer,
  each member measured on its own Gram, at the same budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from basis_sharing.errors import ConfigError
from basis_sharing.linalg.allocation import allocate_ranks
from basis_sharing.linalg.factorization import Decomposition
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.models.families import FamilyAdapter

Decompose = Callable[[GroupPlan], Decomposition]


def component_cost(plan: GroupPlan) -> int:
    """Weights one more basis vector of ``plan`` costs: its basis column and coefficient rows."""
    return plan.d_in + len(plan.layers) * plan.d_out


def rank_cap(plan: GroupPlan) -> int:
    """The largest rank worth keeping: full rank, and never more weights than the dense group."""
    return max(1, min(plan.full_rank, plan.dense_params // component_cost(plan)))


def global_plans(
    plans: Sequence[GroupPlan],
    decompose: Decompose,
    ratio: float,
    scope: str = "kind",
    normalize: bool = False,
    min_rank: int = 1,
) -> list[GroupPlan]:
    """``plans`` with ranks allocated by energy per weight within each kind (``scope="kind"``)
    or across all kinds (``"all"``).

    Each pool keeps at most the weights its uniform ranks keep (``plans``' own ranks), which are
    the budget rule's floor((1 - ratio) x dense) per group: the same budget, so the achieved
    ratio is the uniform plan's or higher, and equal spectra give back the uniform ranks.
    ``ratio`` is accepted for the error message only.
    """
    pools: dict[Any, list[int]] = {}
    for index, plan in enumerate(plans):
        pools.setdefault(plan.kind if scope == "kind" else "all", []).append(index)
    ranks = [p.rank for p in plans]
    for pool, members in pools.items():
        group = [plans[i] for i in members]
        budget = sum(p.params for p in group)
        try:
            chosen = allocate_ranks(
                [decompose(p).sigma for p in group],
                [component_cost(p) for p in group],
                [rank_cap(p) for p in group],
                budget,
                min_rank,
                normalize,
            )
        except ValueError as exc:
            raise ConfigError(
                f"method.allocation=global ({pool}, ratio={ratio}): {exc}; lower method.min_rank."
            ) from exc
        for i, k in zip(members, chosen, strict=True):
            ranks[i] = k
    return [dataclasses.replace(p, rank=k) for p, k in zip(plans, ranks, strict=True)]


def member_errors(
    plan: GroupPlan,
    dec: Decomposition,
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
) -> list[float]:
    """||X_j (W_j - B C_j)||_F^2 of each member at ``plan.rank``, from its own Gram M_j."""
    basis, coefficients = dec.truncate(plan.rank)
    errors = []
    for w, c, gram in zip(weights, coefficients, grams, strict=True):
        delta = w.to(basis.device, torch.float64) - basis @ c
        m = gram.to(basis.device, torch.float64)
        errors.append(float((delta * (m @ delta)).sum().clamp(min=0)))
    return errors


def sharing_errors(
    kind: str,
    shared_plans: Sequence[GroupPlan],
    private_plans: Sequence[GroupPlan],
    decompose: Decompose,
    weight: Callable[[int], torch.Tensor],
    gram: Callable[[int], torch.Tensor],
) -> dict[str, Any]:
    """Output errors of both choices for ``kind`` and the lower one (``shared`` on a tie).

    Args:
        weight: layer -> W (d_in, d_out) of ``kind``. gram: layer -> X^T X of its input.
    """
    totals = {}
    for name, plans in (("shared", shared_plans), ("private", private_plans)):
        total = 0.0
        for plan in plans:
            total += sum(
                member_errors(
                    plan,
                    decompose(plan),
                    [weight(i) for i in plan.layers],
                    [gram(i) for i in plan.layers],
                )
            )
        totals[name] = total
    return {
        "kind": kind,
        "error_shared": totals["shared"],
        "error_private": totals["private"],
        "params_shared": sum(p.params for p in shared_plans),
        "params_private": sum(p.params for p in private_plans),
        "choice": "shared" if totals["shared"] <= totals["private"] else "private",
    }


def family_gram(stats: dict[str, Any], family: FamilyAdapter, kind: str) -> Callable:
    """layer -> the Gram of ``kind``'s input in that layer (float64)."""
    grams = stats["gram"]
    name = family.projection(kind).input
    return lambda layer: grams.gram(layer, name).to(torch.float64)
