"""Whitening and shared truncation against exact oracles (docs/methods.md §3.4-§3.6, §4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from basis_sharing.linalg.factorization import (
    concat_weights,
    decompose_shared,
    shared_rank,
    whitened_error,
)
from basis_sharing.linalg.whitening import unwhiten, whitening_factor

F64 = torch.float64


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


@pytest.fixture
def group():
    """Inputs of two layers and their weights: X_i (tokens, d_in), W_i (d_in, d_out)."""
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(200, 12, generator=g, dtype=F64) @ torch.randn(12, 12, generator=g, dtype=F64)
        for _ in range(2)
    ]
    ws = [torch.randn(12, 7, generator=g, dtype=F64) for _ in range(2)]
    return xs, ws


def test_whitening_factor_is_upper_cholesky(group):
    xs, _ = group
    m = gram_of(xs[0])
    w = whitening_factor(m)
    assert not w.fell_back and w.S.dtype == torch.float64
    assert torch.equal(w.S, w.S.triu())
    torch.testing.assert_close(w.S.T @ w.S, m, rtol=1e-12, atol=1e-9)
    # ||X D||_F == ||S D||_F: what makes truncating S W minimise the output error.
    d = torch.randn(12, 5, dtype=F64)
    assert torch.linalg.matrix_norm(xs[0] @ d) == pytest.approx(
        float(torch.linalg.matrix_norm(w.S @ d)), rel=1e-10
    )


def test_rank_deficient_gram_whitens_without_nan():
    """Dead neurons (always-zero input features) make X^T X singular."""
    x = torch.randn(50, 8, dtype=F64)
    x[:, [2, 5]] = 0.0
    m = gram_of(x).to(torch.float32)
    w = whitening_factor(m, eps=7e-6)
    assert w.fell_back and torch.isfinite(w.S).all()
    lam_min = float(torch.linalg.eigvalsh(m.double())[0])
    assert w.min_eigenvalue == pytest.approx(lam_min)
    assert w.shift == pytest.approx(-lam_min + 7e-6)
    torch.testing.assert_close(
        w.S.T @ w.S, m.double() + w.shift * torch.eye(8, dtype=F64), rtol=0, atol=1e-4
    )


def test_unwhiten_is_a_triangular_solve(group):
    xs, ws = group
    S = whitening_factor(gram_of(xs[0])).S
    torch.testing.assert_close(
        unwhiten(S, ws[0]), torch.linalg.inv(S) @ ws[0], rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    "d_in,d_out,n,ratio,k",
    [  # docs/methods.md §3.6, recomputed from the paper's rule
        (4096, 4096, 2, 0.2, 2184),
        (4096, 4096, 1, 0.2, 1638),
        (4096, 11008, 2, 0.2, 2762),
        (11008, 4096, 1, 0.2, 2388),
        (4096, 4096, 2, 0.5, 1365),
        (11008, 4096, 1, 0.5, 1492),
        (4096, 1024, 1, 0.2, 655),
        (4096, 14336, 2, 0.5, 1792),
        (768, 2304, 2, 0.2, 526),
        (4096, 16384, 2, 0.2, 2912),
    ],
)
def test_shared_rank_matches_the_paper_table(d_in, d_out, n, ratio, k):
    assert shared_rank(d_in, d_out, n, ratio) == k


def test_truncation_error_is_the_discarded_singular_energy(group):
    xs, ws = group
    S = whitening_factor(gram_of(xs[0]) + gram_of(xs[1])).S
    dec = decompose_shared(ws, S)
    assert dec.sigma.numel() == 12 and dec.n_members == 2
    for k in (1, 4, 9, 12):
        basis, coeffs = dec.truncate(k)
        err = whitened_error(S, ws, basis, coeffs)
        assert err == pytest.approx(math.sqrt(float(dec.sigma[k:].pow(2).sum())), abs=1e-9)
        assert err == pytest.approx(dec.discarded_energy(k), abs=1e-9)
        # The whitened error is the error on the group's stacked calibration outputs.
        x = torch.cat(xs)
        direct = torch.sqrt(
            sum(
                torch.linalg.matrix_norm(x @ (w - basis @ c)) ** 2
                for w, c in zip(ws, coeffs, strict=True)
            )
        )
        assert err == pytest.approx(float(direct), rel=1e-8, abs=1e-9)


def test_full_rank_reconstructs_every_member_exactly(group):
    xs, ws = group
    dec = decompose_shared(ws, whitening_factor(gram_of(torch.cat(xs))).S)
    basis, coeffs = dec.truncate(12)
    for w, c in zip(ws, coeffs, strict=True):
        torch.testing.assert_close(basis @ c, w, rtol=0, atol=1e-10)


def test_one_member_group_equals_svd_llm(group):
    """n = 1 is SVD-LLM: SVD of W_hf L, W' = U_k S_k V_k^T L^-1 in the HF (d_out, d_in) layout."""
    xs, ws = group
    m = gram_of(xs[0])
    w_hf = ws[0].T
    L = torch.linalg.cholesky(m)
    U, s, Vh = torch.linalg.svd(w_hf @ L, full_matrices=False)
    k = 4
    oracle = U[:, :k] @ torch.diag(s[:k]) @ Vh[:k] @ torch.linalg.inv(L)
    basis, (coeff,) = decompose_shared([ws[0]], whitening_factor(m).S).truncate(k)
    torch.testing.assert_close((basis @ coeff).T, oracle, rtol=0, atol=1e-9)


def test_group_members_must_share_a_shape():
    with pytest.raises(ValueError, match="one shape"):
        concat_weights([torch.zeros(3, 4), torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="rank 0"):
        decompose_shared([torch.eye(3, dtype=F64)], torch.eye(3, dtype=F64)).truncate(0)
