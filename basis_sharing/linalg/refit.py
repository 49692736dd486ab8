"""Least-squares refit of coefficients on deviated inputs (docs/methods.md §3.9, §4.3).

After compression the inputs X^ of a layer differ from the original X (earlier layers changed).
Keeping the basis B fixed, the coefficients that best reproduce the ORIGINAL weights' outputs on
those inputs solve

    min_C || X^ W_G - X^ B C ||_F   =>   (B^T M B) C = B^T M W_G,   M = X^T X^ (d_in x d_in).

The k x k system is solved by Cholesky (never an explicit inverse), with a diagonal shift when
B^T M B is singular (a basis direction the deviated inputs never excite).
"""

from __future__ import annotations

import torch

from basis_sharing.linalg.whitening import DEFAULT_EPS


def refit_coefficients(
    basis: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """C = (B^T M B)^{-1} B^T M W_G in float64.

    Args:
        basis: B (d_in, k). gram: M (d_in, d_in), Gram of the deviated inputs.
        weights: W_G (d_in, m), the original weights (m = n * d_out for a group).
        eps: relative diagonal shift used only when B^T M B is not positive definite.

    Returns:
        C (k, m).
    """
    b = basis.to(torch.float64)
    m = gram.to(torch.float64)
    mb = m @ b
    lhs = b.T @ mb
    lhs = (lhs + lhs.T) / 2
    rhs = mb.T @ weights.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        lam_min = float(torch.linalg.eigvalsh(lhs)[0])
        shift = -lam_min + eps * max(float(lhs.diagonal().abs().max()), 1.0)
        eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        factor = torch.linalg.cholesky(lhs + shift * eye)
    return torch.cholesky_solve(rhs, factor)


def output_error(gram: torch.Tensor, weights: torch.Tensor, approx: torch.Tensor) -> float:
    """|| X (W - W') ||_F from the Gram alone: sqrt(tr((W - W')^T M (W - W')))."""
    delta = (weights - approx).to(torch.float64)
    return float(torch.sqrt(torch.clamp((delta * (gram.to(torch.float64) @ delta)).sum(), min=0)))
