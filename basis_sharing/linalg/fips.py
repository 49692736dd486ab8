"""FiPS's factorisation of a block group's MLP weights (docs/methods.md §9.1-§9.3).

Every MLP matrix of a group is oriented d x w (model dimension on the rows: up and gate
transposed from their y = x W orientation, down as it is) and the group's matrices are concatenated
along the long axis, M_G = [M_1 | ... | M_m] (d x sum w). M_G ~ U V: one dense U (d x r) for the
group and one slice V_j (r x w_j) per matrix, which FiPS then makes sparse.

The rank comes from the parameter budget of the real shapes (the released code assumes d_ff = 4d):
d r + (1 - s) r sum w <= (1 - ratio) * (the group's dense weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PAD_DIVISOR = 32.0  # the released code's tau: extra rows of V beyond rank d are V's top rows / 32


def fips_rank(
    d: int, widths: Sequence[int], ratio: float, sparsity: float, multiple: int = 1
) -> int:
    """Largest r with d r + (1 - sparsity) r sum(widths) <= (1 - ratio) d sum(widths).

    Args:
        d: the model dimension (rows of every oriented matrix).
        widths: the long side w of each of the group's matrices (d_ff for an LLM's MLP).
        ratio: the fraction of the group's weights removed.
        sparsity: the final fraction of V's entries pruned.
        multiple: round r down to a multiple of it (64 for structured sparsity).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    total = sum(widths)
    rank = math.floor((1.0 - ratio) * d * total / (d + (1.0 - sparsity) * total))
    return rank - rank % multiple


def kept_entries(n: int, sparsity: float) -> int:
    """Entries of an n-entry V kept at ``sparsity``: n - round(sparsity n) (0.5 rounds to even)."""
    return n - round(sparsity * n)


def orient(weight: torch.Tensor, d: int) -> tuple[torch.Tensor, bool]:
    """(the d x w matrix of a projection's W (d_in, d_out), whether it was transposed).

    W is used as it is when its input is the model dimension (up, gate: d x d_ff) and transposed
    when its output is (down: d_ff x d), so both have d rows.
    """
    d_in, d_out = weight.shape
    if d_in == d:
        return weight, False
    if d_out == d:
        return weight.T, True
    raise ValueError(f"a {d_in} x {d_out} matrix has no side of the model dimension {d}")


def svd_init(
    oriented: Sequence[torch.Tensor], rank: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U (d, r) and the V slices (r, w_j) from the thin SVD of M_G in float64.

    U = U_r and V = Sigma_r V_r^T (the singular values go to V). When r exceeds min(d, sum w),
    the rank of M_G at most, U gets zero columns and V extra rows, copies of its top rows divided
    by ``PAD_DIVISOR`` (as the released code pads): U V is still the best rank-min(d, .) product,
    and the extra directions start small and non-zero so training can use them.
    """
    matrices = [m.to(torch.float64) for m in oriented]
    rows = {m.shape[0] for m in matrices}
    if len(rows) != 1:
        raise ValueError(f"oriented matrices must share their row count, got {sorted(rows)}")
    stacked = torch.cat(matrices, dim=1)
    u, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
    full = sigma.shape[0]
    k = min(rank, full)
    basis = u[:, :k]
    v = sigma[:k, None] * vh[:k]
    if rank > full:
        extra = rank - full
        repeats = -(-extra // full)
        pad_v = v.repeat(repeats, 1)[:extra] / PAD_DIVISOR
        basis = torch.cat([basis, basis.new_zeros(basis.shape[0], extra)], dim=1)
        v = torch.cat([v, pad_v], dim=0)
    widths = [m.shape[1] for m in matrices]
    return basis, list(torch.split(v, widths, dim=1))
