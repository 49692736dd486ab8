"""Whitening of calibration statistics (docs/methods.md §3.4, §10.4).

For a layer group with Gram M = sum_i X_i^T X_i (d_in x d_in), any S with S^T S = M gives
||X D||_F = ||S D||_F for every D (d_in x d_out): truncating S W minimises the output error on the
calibration inputs. Two factors are offered:

- ``cholesky`` (SVD-LLM, Basis Sharing): S = L^T with M = L L^T, upper triangular; a Gram that is
  not positive definite is shifted, M + (-lambda_min + eps) I.
- ``eigh`` (SVD-LLM V2): M = Q diag(lambda) Q^T, S = diag(sqrt(lambda'))Q^T with the eigenvalues
  clamped, lambda' = max(lambda, eps): no positive definiteness needed, and directions the
  calibration inputs excite are not shifted at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The Basis Sharing code's diagonal regulariser (SVD-LLM uses 1e-6): when M is not positive
# definite, M + (-lambda_min + eps) I is.
DEFAULT_EPS = 7e-6


WHITENINGS = ("cholesky", "eigh")


@dataclass
class Whitening:
    """S (d_in, d_in) in float64 with S^T S = M (+ shift I, or with clamped eigenvalues).

    ``kind`` says how S is inverted (``unwhiten``): ``cholesky``'s S is upper triangular,
    ``eigh``'s S = diag(sqrt(lambda')) Q^T has orthogonal rows, S S^T = diag(lambda').
    """

    S: torch.Tensor
    shift: float  # diagonal shift added to M (cholesky) or eigenvalues clamped (eigh); 0.0: none
    min_eigenvalue: float | None  # lambda_min of M when the fallback or a clamp ran, else None
    kind: str = "cholesky"
    clamped: int = 0  # eigenvalues raised to eps (eigh)

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


def eigh_whitening_factor(gram: torch.Tensor, eps: float = DEFAULT_EPS) -> Whitening:
    """S = diag(sqrt(lambda')) Q^T from M = Q diag(lambda) Q^T, lambda' = max(lambda, eps).

    Args:
        gram: M (d_in, d_in), symmetric, any float dtype and device.
        eps: the smallest eigenvalue kept; smaller (and negative, rounding) ones are raised to it.

    Returns:
        Whitening of kind ``eigh``; ``shift`` is the largest amount an eigenvalue was raised by.
    """
    m = gram.to(torch.float64)
    m = (m + m.T) / 2
    lam, q = torch.linalg.eigh(m)
    low = lam < eps
    clamped = int(low.sum())
    shift = float((eps - lam[low]).max()) if clamped else 0.0
    S = (lam.clamp(min=eps).sqrt()[:, None] * q.T).contiguous()
    return Whitening(
        S=S,
        shift=shift,
        min_eigenvalue=float(lam[0]) if clamped else None,
        kind="eigh",
        clamped=clamped,
    )


def whiten(gram: torch.Tensor, kind: str = "cholesky", eps: float = DEFAULT_EPS) -> Whitening:
    """The whitening factor of ``gram`` by ``kind`` (``WHITENINGS``)."""
    if kind == "cholesky":
        return whitening_factor(gram, eps)
    if kind == "eigh":
        return eigh_whitening_factor(gram, eps)
    raise ValueError(f"unknown whitening {kind!r}; valid: {', '.join(WHITENINGS)}")


def unwhiten(S: torch.Tensor, Y: torch.Tensor, kind: str = "cholesky") -> torch.Tensor:
    """S^{-1} Y, never through an explicit inverse.

    Args:
        S: (d, d), upper triangular (``cholesky``: a triangular solve) or with orthogonal rows
            (``eigh``: S^{-1} = S^T diag(1 / |row|^2), exact since S S^T = diag(lambda')).
        Y: (d, m).
    """
    if kind == "cholesky":
        return torch.linalg.solve_triangular(S, Y, upper=True)
    if kind == "eigh":
        return S.T @ (Y / S.pow(2).sum(dim=1, keepdim=True))
    raise ValueError(f"unknown whitening {kind!r}; valid: {', '.join(WHITENINGS)}")
