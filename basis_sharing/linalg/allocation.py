"""Global rank allocation over truncated factorisations (docs/methods.md §10.2).

Keeping component i of group g (a basis vector and its coefficient rows) costs
c_g = d_in + n_g d_out weights and removes sigma_{g,i}^2 from the group's whitened truncation
error (the calibration output error of its members). Under one weight budget, taking components
by the largest energy per weight, sigma_{g,i}^2 / c_g, is the greedy solution of that knapsack;
because each group's singular values are sorted, every group keeps a prefix of its spectrum,
i.e. a rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    costs: Sequence[int],
    caps: Sequence[int],
    budget: int,
    min_rank: int = 1,
    normalize: bool = False,
) -> list[int]:
    """Ranks k_g with sum_g k_g c_g <= ``budget`` keeping the most energy per weight.

    Args:
        spectra: per group, its singular values sigma_g (descending).
        costs: per group, the weights one component costs, c_g = d_in + n_g d_out.
        caps: per group, the largest rank allowed (at most len(sigma_g)).
        budget: weights the groups may keep together.
        min_rank: every group keeps at least min(min_rank, cap_g) components, taken first.
        normalize: score sigma_{g,i}^2 / (sum_i sigma_{g,i}^2) / c_g: each group's energy as a
            fraction of its own total, so groups with large weights do not take everything.

    Returns:
        One rank per group. Components are taken in decreasing score; a component that does not
        fit closes its group (later components of that group would break the prefix), the others
        go on, so the budget is filled as far as whole components allow.

    Raises:
        ValueError: the minimum ranks alone exceed the budget, or the inputs disagree in length.
    """
    if not len(spectra) == len(costs) == len(caps):
        raise ValueError("spectra, costs and caps need one entry per group")
    ranks = [min(min_rank, int(cap)) for cap in caps]
    spent = sum(k * c for k, c in zip(ranks, costs, strict=True))
    if spent > budget:
        raise ValueError(
            f"the minimum rank {min_rank} of every group already needs {spent} weights, more "
            f"than the budget of {budget}"
        )
    scores, groups = [], []
    for g, (sigma, cost, cap) in enumerate(zip(spectra, costs, caps, strict=True)):
        energy = sigma.detach().to("cpu", torch.float64).pow(2)
        if normalize:
            energy = energy / max(float(energy.sum()), torch.finfo(torch.float64).tiny)
        energy = energy[: int(cap)]
        rest = energy[ranks[g] :] / cost
        scores.append(rest)
        groups.append(torch.full_like(rest, g, dtype=torch.int64))
    if not scores:
        return ranks
    score = torch.cat(scores)
    group = torch.cat(groups)
    # Decreasing score; ties keep the concatenation order (group, then position), so a group's
    # prefix order survives equal singular values.
    order = torch.sort(score, descending=True, stable=True).indices
    closed = [False] * len(ranks)
    for g in group[order].tolist():
        if closed[g]:
            continue
        if spent + costs[g] > budget:
            closed[g] = True
            if all(closed):
                break
            continue
        ranks[g] += 1
        spent += costs[g]
    return ranks
