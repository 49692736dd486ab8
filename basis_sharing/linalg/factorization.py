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
from dataclasses import dataclass, fields, replace

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


# How a group's factorisation is computed (docs/methods.md §5.1): the thin SVD of S W_G (the
# reference), the eigendecomposition of its smaller Gram, or per group by shape.
DECOMPOSITIONS = ("svd", "gram_eigh", "auto")
# auto takes gram_eigh when the long side of S W_G is at least this many times the short one
# (measured: scripts/bench_decomposition.py); nearer to square the thin SVD is kept.
AUTO_ASPECT = 1.5


def decomposition_path(d_in: int, width: int, choice: str) -> str:
    """``svd`` or ``gram_eigh`` for S W_G of shape (d_in, width) under ``method.decomposition``."""
    if choice not in DECOMPOSITIONS:
        raise ValueError(f"decomposition {choice!r} is not one of {DECOMPOSITIONS}")
    if choice != "auto":
        return choice
    return "gram_eigh" if max(d_in, width) >= AUTO_ASPECT * min(d_in, width) else "svd"


@dataclass(kw_only=True)
class Decomposition:
    """A group's factorisation of S W_G, kept whole so that any rank can be cut from it.

    Attributes:
        S: (d_in, d_in) whitening factor.
        sigma: (r,) singular values of S W_G, largest first, r = min(d_in, n * d_out).
        d_out: width of one member's slice of the coefficients.
        shift: the eigenvalue shift the whitening needed, carried along for the run record.
        whitening: how S was made, hence how it is inverted (``linalg.whitening.unwhiten``).
    """

    S: torch.Tensor
    sigma: torch.Tensor
    d_out: int
    shift: float = 0.0  # diagonal shift the whitening needed (0.0: the Gram was definite)
    whitening: str = "cholesky"

    @property
    def width(self) -> int:
        """n * d_out, the columns of W_G."""
        raise NotImplementedError

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k Sigma_k (d_in, k), V_k^T (k, n * d_out)) of the rank-k truncation."""
        raise NotImplementedError

    @property
    def n_members(self) -> int:
        return self.width // self.d_out

    def truncate(self, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Basis B (d_in, k) = S^{-1} U_k Sigma_k and coefficients C_j (k, d_out), float64."""
        if not 0 < k <= self.sigma.numel():
            raise ValueError(f"rank {k} outside [1, {self.sigma.numel()}]")
        scaled_left, right = self.factors(k)
        basis = unwhiten(self.S, scaled_left, self.whitening)
        coefficients = [
            right[:, j * self.d_out : (j + 1) * self.d_out] for j in range(self.n_members)
        ]
        return basis, coefficients

    def discarded_energy(self, k: int) -> float:
        """sqrt(sum of squared singular values beyond k): the whitened truncation error."""
        return float(self.sigma[k:].pow(2).sum().sqrt())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str):
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})


@dataclass(kw_only=True)
class SharedDecomposition(Decomposition):
    """The thin SVD S W_G = U Sigma V^T: U (d_in, r), Vh (r, n * d_out) (the reference path)."""

    U: torch.Tensor
    Vh: torch.Tensor

    @property
    def width(self) -> int:
        return self.Vh.shape[1]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U[:, :k] * self.sigma[:k], self.Vh[:k]


@dataclass(kw_only=True)
class GramEighDecomposition(Decomposition):
    """The same factorisation from the eigendecomposition of the smaller Gram of A = S W_G.

    ``side="left"`` (n d_out >= d_in): A A^T = U Sigma^2 U^T (d_in x d_in), ``vectors`` = U; the
    right vectors of a truncation are formed only for the kept k, V_k^T = Sigma_k^{-1} U_k^T A.
    ``side="right"`` (d_in the larger side): A^T A = V Sigma^2 V^T, ``vectors`` = V (n d_out, r),
    and U_k Sigma_k = A V_k. A (d_in, n d_out) is kept in the place of the SVD's other factor (the
    same size) so that any rank can still be cut. Squaring A squares its condition number:
    singular values below about sqrt(machine eps) x sigma_max lose their relative accuracy
    (absolute error ~ eps sigma_max^2 / sigma), which leaves the kept components of a truncation
    and the discarded energy accurate.
    """

    vectors: torch.Tensor
    A: torch.Tensor
    side: str

    @property
    def width(self) -> int:
        return self.A.shape[1]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vectors[:, :k]
        if self.side == "right":
            return self.A @ v, v.T
        sigma = self.sigma[:k]
        # A zero singular value's row of V^T is arbitrary in the SVD; 0 adds nothing to B C.
        tiny = sigma <= torch.finfo(sigma.dtype).eps * max(float(self.sigma[0]), 1e-300)
        inv = torch.where(tiny, torch.zeros_like(sigma), 1.0 / sigma.clamp_min(1e-300))
        return v * sigma, (v.T @ self.A) * inv[:, None]


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values, vectors) from eigh of a Gram A A^T or A^T A, largest first."""
    lam, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    return lam.flip(0).clamp_min(0).sqrt(), vectors.flip(1)


def decompose_shared(
    weights: Sequence[torch.Tensor],
    S: torch.Tensor,
    shift: float = 0.0,
    whitening: str = "cholesky",
    path: str = "svd",
) -> Decomposition:
    """Factorisation of S [W_1 | ... | W_n] in float64 on S's device.

    Args:
        weights: n matrices (d_in, d_out) in y = x W orientation.
        S: (d_in, d_in) whitening factor of the group (S^T S = summed Gram).
        shift: the whitening's eigenvalue shift, recorded with the result.
        whitening: the factor's kind (``cholesky``: S upper triangular; ``eigh``).
        path: ``svd`` (thin SVD, the reference), ``gram_eigh`` (eigh of the smaller Gram) or
            ``auto`` (``decomposition_path``).
    """
    w_group = concat_weights(weights).to(S.device)
    a = S.to(torch.float64) @ w_group
    d_out = weights[0].shape[1]
    if decomposition_path(*a.shape, path) == "svd":
        U, sigma, Vh = torch.linalg.svd(a, full_matrices=False)
        return SharedDecomposition(
            S=S, U=U, sigma=sigma, Vh=Vh, d_out=d_out, shift=shift, whitening=whitening
        )
    side = "left" if a.shape[1] >= a.shape[0] else "right"
    sigma, vectors = _descending_eigh(a @ a.T if side == "left" else a.T @ a)
    return GramEighDecomposition(
        S=S,
        sigma=sigma,
        d_out=d_out,
        shift=shift,
        whitening=whitening,
        vectors=vectors,
        A=a,
        side=side,
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
