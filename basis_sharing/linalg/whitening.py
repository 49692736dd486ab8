"""Cholesky whitening of calibration statistics (docs/methods.md §3.4).

For a layer group with Gram M = sum_i X_i^T X_i (d_in x d_in), S = L^T with M = L L^T is the
upper-triangular factor with S^T S = M, so that ||X D||_F = ||S D||_F for any D (d_in x d_out):
truncating S W minimises the output error on the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The Basis Sharing code's diagonal regulariser (SVD-LLM uses 1e-6): when M is not positive
# definite, M + (-lambda_min + eps) I is.
DEFAULT_EPS = 7e-6


@dataclass
class Whitening:
    """S (d_in, d_in), upper triangular, float64, with S^T S = M (+ shift I)."""

    S: torch.Tensor
    shift: float  # diagonal shift added to M; 0.0 when M was positive definite
    min_eigenvalue: float | None  # lambda_min of M when the fallback ran, else None

    @property
    def fell_back(self) -> bool:
        return self.shift != 0.0


def whitening_factor(gram: torch.Tensor, eps: float = DEFAULT_EPS) -> Whitening:
    """Cholesky factor of a Gram matrix, with the eigenvalue-shift fallback.

    Args:
        gram: M (d_in, d_in), symmetric positive semi-definite, any float dtype and device.
        eps: added on top of -lambda_min when M is not positive definite (rank-deficient Grams:
            dead neurons, the wide down_proj input, too few calibration tokens).

    Returns:
        Whitening with S (d_in, d_in) float64 on ``gram``'s device.
    """
    m = gram.to(torch.float64)
    m = (m + m.T) / 2  # fp32 accumulation leaves tiny asymmetries
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0 and torch.isfinite(factor).all():
        return Whitening(S=factor.T.contiguous(), shift=0.0, min_eigenvalue=None)
    lam_min = float(torch.linalg.eigvalsh(m)[0])
    shift = -lam_min + eps
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    factor = torch.linalg.cholesky(m + shift * eye)
    return Whitening(S=factor.T.contiguous(), shift=shift, min_eigenvalue=lam_min)


def unwhiten(S: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """S^{-1} Y by a triangular solve (never an explicit inverse).

    Args:
        S: (d, d) upper triangular. Y: (d, m).
    """
    return torch.linalg.solve_triangular(S, Y, upper=True)
