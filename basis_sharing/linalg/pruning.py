"""Gradual magnitude pruning (GMP) of FiPS's V (docs/methods.md §9.5).

The accelerated cubic schedule: sparsity ``initial`` from step 0, then at the mask updates
between t_accel and t_end (the steps that are multiples of delta_t) the cubic

    s(t) = final + (accel - final) * (1 - (t - t_accel) / D)^3

with D = t_end - t_accel (the default, which reaches ``final`` at t_end, where the mask is also
updated), or D = t_end (``released``: the released code's formula, which stops short of the
target: 71.2 % instead of 75 % with its t_accel = 0.4 and t_end = 0.75 of the steps). After t_end
the masks are frozen. Masks are global over the tensors pruned together (one MLP's V slices):
the entries of largest magnitude survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from basis_sharing.linalg.fips import kept_entries

SCHEDULES = ("exact", "released")
STRUCTURES = ("none", "2:4")


@dataclass(frozen=True)
class GMPSchedule:
    """When the masks change and to which sparsity (steps count optimizer steps from 0)."""

    steps: int  # optimizer steps of the whole run
    final: float  # the target sparsity
    initial: float  # from step 0
    accel: float  # at t_accel, where the cubic starts
    t_accel: int
    t_end: int
    delta_t: int
    schedule: str = "exact"  # or "released"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.t_accel <= self.t_end <= self.steps:
            raise ValueError(
                f"need 0 <= t_accel ({self.t_accel}) <= t_end ({self.t_end}) <= steps "
                f"({self.steps})"
            )
        if not 0.0 <= self.initial <= self.accel <= self.final < 1.0:
            raise ValueError(
                f"need 0 <= initial ({self.initial}) <= accel ({self.accel}) <= final "
                f"({self.final}) < 1"
            )
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")

    def sparsity(self, t: int) -> float:
        """The target sparsity of the formula at step ``t`` (``initial`` before t_accel)."""
        if t < self.t_accel:
            return self.initial
        t = min(t, self.t_end)
        span = self.t_end - self.t_accel if self.schedule == "exact" else self.t_end
        if span == 0:
            return self.final
        return self.final + (self.accel - self.final) * (1.0 - (t - self.t_accel) / span) ** 3

    def update_steps(self) -> list[int]:
        """Steps at which the masks are recomputed: 0, then multiples of delta_t in
        [t_accel, t_end]; ``exact`` also updates at t_end itself so that it ends on the target."""
        steps = {0} | {t for t in range(self.t_accel, self.t_end + 1) if t % self.delta_t == 0}
        if self.schedule == "exact":
            steps.add(self.t_end)
        return sorted(steps)

    def reached(self) -> float:
        """The sparsity the masks have after the last update."""
        return self.sparsity(self.update_steps()[-1])


def magnitude_masks(tensors: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean masks keeping the largest-magnitude entries over all ``tensors`` together.

    Exactly ``kept_entries(n, sparsity)`` of the n entries survive (ties broken by ``topk``).
    """
    flat = torch.cat([t.detach().abs().flatten() for t in tensors])
    keep = kept_entries(flat.numel(), sparsity)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    sizes = [t.numel() for t in tensors]
    return [m.view(t.shape) for m, t in zip(torch.split(mask, sizes), tensors, strict=True)]


def two_four_mask(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """2:4 mask: in every run of 4 consecutive entries along ``dim``, the 2 largest survive."""
    moved = tensor.detach().abs().movedim(dim, -1)
    if moved.shape[-1] % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 along dim {dim}, got {moved.shape}")
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(moved.shape).movedim(-1, dim)
