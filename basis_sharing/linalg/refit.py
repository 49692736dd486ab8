"""Least-squares refits of coefficients (and shared bases) on deviated inputs (docs/methods.md
§3.9, §4.3, §10.1).

After compression the inputs X^ of a layer differ from the original X (earlier layers changed).
Two targets are refit here, the basis B fixed:

- the deviated target (``refit_coefficients``): the original weights applied to the deviated
  inputs,

      min_C || X^ W_G - X^ B C ||_F   =>   (B^T M^ B) C = B^T M^ W_G,   M^ = X^^T X^;

- the original outputs (``compensated_coefficients``): what the dense model actually produced,
  so the error the earlier layers let through is compensated too,

      min_C || X^ B C - X W ||_F      =>   (B^T M^ B) C = B^T P W,      P = X^^T X.

The k x k systems are solved by Cholesky (never an explicit inverse), with a diagonal shift when
B^T M^ B is singular (a basis direction the deviated inputs never excite). ``refit_shared_basis``
also refits a group's shared basis by alternating least squares over its members.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from basis_sharing.linalg.whitening import DEFAULT_EPS

F64 = torch.float64
Tensors = Sequence[torch.Tensor]


def spd_cholesky(lhs: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric ``lhs``, shifted when it is not positive definite.

    The shift is -lambda_min + eps * max(|diag|, 1) (docs/methods.md §3.9); ``lhs`` is
    symmetrised first, so roundoff asymmetry does not matter.
    """
    lhs = (lhs + lhs.T) / 2
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return factor
    lam_min = float(torch.linalg.eigvalsh(lhs)[0])
    shift = -lam_min + eps * max(float(lhs.diagonal().abs().max()), 1.0)
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.cholesky(lhs + shift * eye)


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
    b = basis.to(F64)
    mb = gram.to(F64) @ b
    return torch.cholesky_solve(mb.T @ weights.to(F64), spd_cholesky(b.T @ mb, eps))


@dataclass
class CompensatedSystem:
    """One member's compensated least squares in the basis' k dimensions (docs/methods.md §10.1).

    ``lhs`` = B^T M^ B (k, k), ``rhs`` = B^T P W (k, d_out) and ``constant`` = tr(W^T M W) =
    ||X W||_F^2: the solve and the error of any C need nothing else, so neither costs a
    d_in x d_in x d_out product (building the system costs two d_in x d_in x k ones).
    """

    lhs: torch.Tensor
    rhs: torch.Tensor
    constant: float

    @classmethod
    def build(
        cls,
        basis: torch.Tensor,
        gram_hat: torch.Tensor,
        cross: torch.Tensor,
        weights: torch.Tensor,
        constant: float,
    ) -> CompensatedSystem:
        """From B (d_in, k), M^ = X^^T X^, P = X^^T X (d_in, d_in), W (d_in, d_out), ||X W||^2."""
        b = basis.to(F64)
        lhs = b.T @ (gram_hat.to(F64) @ b)
        rhs = (cross.to(F64).T @ b).T @ weights.to(F64)  # (B^T P) W: k < d_out is the cheap order
        return cls(lhs, rhs, float(constant))

    def solve(self, eps: float = DEFAULT_EPS) -> torch.Tensor:
        """C (k, d_out) = lhs^{-1} rhs by Cholesky (the §3.9 shift when lhs is singular)."""
        return torch.cholesky_solve(self.rhs, spd_cholesky(self.lhs, eps))

    def objective(self, coefficients: torch.Tensor) -> float:
        """tr(C^T lhs C) - 2 tr(C^T rhs): the squared error less its constant (may be < 0)."""
        c = coefficients.to(F64)
        return float((c * (self.lhs @ c)).sum() - 2 * (c * self.rhs).sum())

    def error(self, coefficients: torch.Tensor) -> float:
        """||X^ B C - X W||_F = sqrt(objective + constant), clamped at 0 (roundoff)."""
        return math.sqrt(max(self.objective(coefficients) + self.constant, 0.0))


def compensated_coefficients(
    basis: torch.Tensor,
    gram_hat: torch.Tensor,
    cross: torch.Tensor,
    weights: torch.Tensor,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """C = argmin ||X^ B C - X W||_F = (B^T M^ B)^{-1} B^T P W in float64 (docs/methods.md §10.1).

    Args:
        basis: B (d_in, k).
        gram_hat: M^ = X^^T X^ (d_in, d_in), the inputs inside the compressed model.
        cross: P = X^^T X (d_in, d_in), against the original model's inputs on the same tokens.
        weights: W (d_in, d_out), the original weights.
        eps: relative diagonal shift used only when B^T M^ B is not positive definite.

    Returns:
        C (k, d_out).
    """
    return CompensatedSystem.build(basis, gram_hat, cross, weights, 0.0).solve(eps)


def output_error(gram: torch.Tensor, weights: torch.Tensor, approx: torch.Tensor) -> float:
    """|| X (W - W') ||_F from the Gram alone: sqrt(tr((W - W')^T M (W - W')))."""
    delta = (weights - approx).to(F64)
    return float(torch.sqrt(torch.clamp((delta * (gram.to(F64) @ delta)).sum(), min=0)))


def compensated_error(
    gram_hat: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    weights: torch.Tensor,
    basis: torch.Tensor,
    coefficients: torch.Tensor,
) -> float:
    """||X^ B C - X W||_F from the Grams alone (docs/methods.md §10.1):

        sqrt(tr(C^T B^T M^ B C) - 2 tr(C^T B^T P W) + tr(W^T M W)),  P = X^^T X, M = X^T X,

    clamped at 0 (roundoff can make the sum slightly negative when the fit is exact).
    """
    w = weights.to(F64)
    constant = float((w * (gram.to(F64) @ w)).sum())
    return CompensatedSystem.build(basis, gram_hat, cross, w, constant).error(coefficients)


def _systems(basis: torch.Tensor, grams_hat: Tensors, crosses: Tensors, weights: Tensors):
    return [
        CompensatedSystem.build(basis, m, p, w, 0.0)
        for m, p, w in zip(grams_hat, crosses, weights, strict=True)
    ]


def _coefficient_step(systems: Sequence[CompensatedSystem], coefficients: Tensors, eps: float):
    """Each member's compensated C_j; a member keeps its old C_j if that is better (only possible
    when the shifted fallback solved a singular system). Returns (C_j list, objective)."""
    out, total = [], 0.0
    for system, c in zip(systems, coefficients, strict=True):
        new = system.solve(eps)
        new_value, old_value = system.objective(new), system.objective(c)
        out.append(new if new_value <= old_value else c)
        total += min(new_value, old_value)
    return out, total


def _basis_step(
    basis: torch.Tensor,
    coefficients: Tensors,
    grams_hat: Tensors,
    crosses: Tensors,
    weights: Tensors,
    cg_steps: int,
) -> torch.Tensor:
    """B minimising sum_j tr(C_j^T B^T M^_j B C_j) - 2 tr(B^T sum_j P_j W_j C_j^T).

    Conjugate gradients on the normal equations sum_j M^_j B G_j = R (G_j = C_j C_j^T,
    R = sum_j P_j W_j C_j^T) under the Frobenius inner product, from the current B: the operator
    is positive semi-definite, so every step (an exact line search) never increases the quadratic.
    """
    pairs = [(m, c @ c.T) for m, c in zip(grams_hat, coefficients, strict=True)]
    rhs = sum(p @ (w @ c.T) for p, w, c in zip(crosses, weights, coefficients, strict=True))

    def apply(x: torch.Tensor) -> torch.Tensor:
        return sum(m @ x @ g for m, g in pairs)

    b = basis.clone()
    residual = rhs - apply(b)
    direction = residual.clone()
    rs = float((residual * residual).sum())
    tol = (1e-14 * float(torch.linalg.matrix_norm(rhs))) ** 2
    for _ in range(cg_steps):
        if rs <= tol:
            break
        image = apply(direction)
        curvature = float((direction * image).sum())
        if curvature <= 0:  # a direction the quadratic is flat along: nothing to gain
            break
        alpha = rs / curvature
        b += alpha * direction
        residual -= alpha * image
        rs_new = float((residual * residual).sum())
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    return b


def refit_shared_basis(
    basis: torch.Tensor,
    coefficients: Sequence[torch.Tensor],
    grams_hat: Sequence[torch.Tensor],
    crosses: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    eps: float = DEFAULT_EPS,
    iterations: int = 2,
    cg_steps: int = 32,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Alternating least squares for a shared basis (docs/methods.md §10.1).

    Minimises sum_j ||X^_j B C_j - X_j W_j||_F^2 over B and every member's C_j, each member on its
    own statistics: first a C-step (``compensated_coefficients`` per member), then per iteration a
    B-step (conjugate gradients from the current B, ``cg_steps`` at most) and a C-step. Both steps
    minimise a convex quadratic from the current point, so the objective never increases.

    Args:
        basis: B (d_in, k), the starting basis.
        coefficients: C_j (k, d_out) per member (the starting point of the C-step's safeguard).
        grams_hat: M^_j = X^_j^T X^_j per member. crosses: P_j = X^_j^T X_j per member.
        weights: W_j (d_in, d_out) per member, the original weights.
        eps: the coefficient solves' fallback shift. iterations: B-step + C-step rounds.
        cg_steps: conjugate-gradient steps per B-step.

    Returns:
        (B, [C_j], history) in float64. history[0] is the objective after the first C-step (the
        coefficient-only refit's when the C_j were already refit for ``basis``), history[t] the
        one after iteration t. The objective EXCLUDES the constant sum_j tr(W_j^T M_j W_j), so it
        is the squared error less that constant (it may be negative).
    """
    b = basis.to(F64)
    stats = (
        [m.to(F64) for m in grams_hat],
        [p.to(F64) for p in crosses],
        [w.to(F64) for w in weights],
    )
    cs, value = _coefficient_step(_systems(b, *stats), [c.to(F64) for c in coefficients], eps)
    history = [value]
    for _ in range(iterations):
        b = _basis_step(b, cs, *stats, cg_steps)
        cs, value = _coefficient_step(_systems(b, *stats), cs, eps)
        history.append(value)
    return b, cs, history
