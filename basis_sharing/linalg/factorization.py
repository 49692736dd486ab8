"""Shared-basis truncated factorisation of a layer group (docs/methods.md §3.5, §3.6).

W_G = [W_1 | ... | W_n] (d_in x n*d_out, y = x W orientation). With S the group's whitening
factor, the thin SVD S W_G = U Sigma V^T gives the basis B = S^{-1} U_k Sigma_k (d_in x k) and the
coefficients C = V_k^T, whose j-th d_out-wide slice C_j serves layer j: W_j ~ B C_j. Truncation
minimises sum_j ||X (W_j - B C_j)||_F^2 with X^T X = S^T S (the group's summed Gram), and the
whitened error is exactly sqrt(sum of the discarded squared singular values).

The SVD does not depend on the compression ratio, so a sweep decomposes each group once and
truncates per ratio (``SharedDecomposition.truncate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from basis_sharing.linalg.whitening import unwhiten


def shared_rank(d_in: int, d_out: int, n: int, ratio: float) -> int:
    """Basis size k that keeps a fraction (1 - ratio) of a group's n * d_in * d_out weights.

    d_in * k (basis) + n * k * d_out (coefficients) = (1 - ratio) * n * d_in * d_out, rounded
    down (App. A.1 of the paper). n = 1 is SVD-LLM's per-layer rank rule.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return math.floor(d_in * d_out * n * (1.0 - ratio) / (d_in + n * d_out))


def concat_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """W_G = [W_1 | ... | W_n]: (d_in, n * d_out) from n matrices (d_in, d_out), in float64."""
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"group members must have one shape, got {sorted(shapes)}")
    return torch.cat([w.to(torch.float64) for w in weights], dim=1)


@dataclass
class SharedDecomposition:
    """Thin SVD of S W_G, kept whole so that any rank can be cut from it.

    Attributes:
        S: (d_in, d_in) upper-triangular whitening factor.
        shift: the eigenvalue shift the whitening needed, carried along for the run record.
        U: (d_in, r), sigma: (r,), Vh: (r, n * d_out), with r = min(d_in, n * d_out).
        d_out: width of one member's slice of Vh.
        whitening: how S was made, hence how it is inverted (``linalg.whitening.unwhiten``).
    """

    S: torch.Tensor
    U: torch.Tensor
    sigma: torch.Tensor
    Vh: torch.Tensor
    d_out: int
    shift: float = 0.0  # diagonal shift the whitening needed (0.0: the Gram was definite)
    whitening: str = "cholesky"

    @property
    def n_members(self) -> int:
        return self.Vh.shape[1] // self.d_out

    def truncate(self, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Basis B (d_in, k) = S^{-1} U_k Sigma_k and coefficients C_j (k, d_out), float64."""
        if not 0 < k <= self.sigma.numel():
            raise ValueError(f"rank {k} outside [1, {self.sigma.numel()}]")
        basis = unwhiten(self.S, self.U[:, :k] * self.sigma[:k], self.whitening)
        coefficients = [
            self.Vh[:k, j * self.d_out : (j + 1) * self.d_out] for j in range(self.n_members)
        ]
        return basis, coefficients

    def discarded_energy(self, k: int) -> float:
        """sqrt(sum of squared singular values beyond k): the whitened truncation error."""
        return float(self.sigma[k:].pow(2).sum().sqrt())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.U, self.sigma, self.Vh))

    def to(self, device: torch.device | str) -> SharedDecomposition:
        return SharedDecomposition(
            self.S.to(device),
            self.U.to(device),
            self.sigma.to(device),
            self.Vh.to(device),
            self.d_out,
            self.shift,
            self.whitening,
        )


def decompose_shared(
    weights: Sequence[torch.Tensor],
    S: torch.Tensor,
    shift: float = 0.0,
    whitening: str = "cholesky",
) -> SharedDecomposition:
    """SVD of S [W_1 | ... | W_n] in float64 on S's device.

    Args:
        weights: n matrices (d_in, d_out) in y = x W orientation.
        S: (d_in, d_in) whitening factor of the group (S^T S = summed Gram).
        shift: the whitening's eigenvalue shift, recorded with the result.
        whitening: the factor's kind (``cholesky``: S upper triangular; ``eigh``).
    """
    w_group = concat_weights(weights).to(S.device)
    U, sigma, Vh = torch.linalg.svd(S.to(torch.float64) @ w_group, full_matrices=False)
    return SharedDecomposition(
        S=S, U=U, sigma=sigma, Vh=Vh, d_out=weights[0].shape[1], shift=shift, whitening=whitening
    )


def whitened_error(
    S: torch.Tensor,
    weights: Sequence[torch.Tensor],
    basis: torch.Tensor,
    coefficients: Sequence[torch.Tensor],
) -> float:
    """||S (W_G - B [C_1 | ... | C_n])||_F: the group's error on its calibration inputs."""
    approx = basis @ torch.cat(list(coefficients), dim=1)
    return float(torch.linalg.matrix_norm(S @ (concat_weights(weights).to(S.device) - approx)))
