"""``method.decomposition=svd|gram_eigh|auto`` (docs/methods.md §5.1): the eigendecomposition of
the smaller Gram of S W_G against the thin SVD it replaces, float64."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import collect_grams
from basis_sharing.errors import ConfigError
from basis_sharing.linalg.factorization import (
    GramEighDecomposition,
    decompose_shared,
    decomposition_path,
)
from basis_sharing.linalg.whitening import whitening_factor
from basis_sharing.methods.basis_sharing import BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import family_for_model_type, get_family

F64 = torch.float64
CPU = torch.device("cpu")


def group(d_in: int, d_out: int, n: int, cond: float, seed: int = 0):
    """n members (d_in, d_out) whose whitened S W_G has singular values from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d_in, d_in, generator=g, dtype=F64)
    S = whitening_factor(x.T @ x).S
    r = min(d_in, n * d_out)
    u, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n * d_out, r, generator=g, dtype=F64))
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=F64)
    a = u @ torch.diag(sigma) @ v.T
    w_group = torch.linalg.solve_triangular(S, a, upper=True)
    return [w_group[:, j * d_out : (j + 1) * d_out] for j in range(n)], S, sigma


def projector(dec, k):
    u = dec.factors(k)[0]
    q, _ = torch.linalg.qr(u)
    return q @ q.T


@pytest.mark.parametrize(
    ("d_in", "d_out", "n", "side"), [(24, 40, 2, "left"), (48, 10, 2, "right")]
)
def test_gram_eigh_matches_the_thin_svd_on_a_well_conditioned_group(d_in, d_out, n, side):
    weights, S, sigma = group(d_in, d_out, n, cond=10.0)
    ref = decompose_shared(weights, S, path="svd")
    dec = decompose_shared(weights, S, path="gram_eigh")
    assert isinstance(dec, GramEighDecomposition) and dec.side == side
    assert dec.n_members == n and dec.sigma.numel() == ref.sigma.numel()
    torch.testing.assert_close(dec.sigma, ref.sigma, rtol=1e-8, atol=0)
    torch.testing.assert_close(ref.sigma, sigma, rtol=1e-10, atol=0)
    for k in (1, 5, ref.sigma.numel() // 2, ref.sigma.numel()):
        torch.testing.assert_close(projector(dec, k), projector(ref, k), rtol=0, atol=1e-8)
        basis, coefficients = dec.truncate(k)
        ref_basis, ref_coefficients = ref.truncate(k)
        assert dec.discarded_energy(k) == pytest.approx(
            ref.discarded_energy(k), rel=1e-8, abs=1e-12
        )
        for c, ref_c in zip(coefficients, ref_coefficients, strict=True):
            want = ref_basis @ ref_c
            scale = float(want.abs().max())
            torch.testing.assert_close(basis @ c, want, rtol=0, atol=1e-8 * scale)
    full_basis, full = dec.truncate(dec.sigma.numel())
    for w, c in zip(weights, full, strict=True):  # full rank gives the weights back
        torch.testing.assert_close(full_basis @ c, w, rtol=0, atol=1e-8 * float(w.abs().max()))


def test_ill_conditioned_group_keeps_the_large_components():
    """cond(S W_G) = 1e6: eigh of the Gram squares it (1e12). Each singular value is within
    10 eps sigma_max^2 / sigma_i of the SVD's (the Gram's roundoff eps sigma_max^2, halved by the
    square root and divided by sigma_i: 1e-10 relative at the smallest here); the kept
    components (sigma >= 1e-3 sigma_max) match to 1e-7 relative, and so does B C."""
    weights, S, _ = group(32, 48, 2, cond=1e6)
    ref = decompose_shared(weights, S, path="svd")
    dec = decompose_shared(weights, S, path="gram_eigh")
    eps = torch.finfo(F64).eps
    bound = 10 * eps * float(ref.sigma[0]) ** 2 / ref.sigma
    assert bool(((dec.sigma - ref.sigma).abs() <= bound).all())
    k = int((ref.sigma >= 1e-3 * ref.sigma[0]).sum())
    assert 0 < k < ref.sigma.numel()
    torch.testing.assert_close(dec.sigma[:k], ref.sigma[:k], rtol=1e-7, atol=0)
    basis, coefficients = dec.truncate(k)
    ref_basis, ref_coefficients = ref.truncate(k)
    for c, ref_c in zip(coefficients, ref_coefficients, strict=True):
        want = ref_basis @ ref_c
        torch.testing.assert_close(basis @ c, want, rtol=0, atol=1e-7 * float(want.abs().max()))


def test_a_rank_deficient_group_truncates_without_dividing_by_zero():
    weights, S, _ = group(16, 12, 2, cond=10.0)
    weights = [weights[0], weights[0]]  # rank <= 12 of 16 left vectors: zero singular values
    dec = decompose_shared(weights, S, path="gram_eigh")
    assert dec.side == "left"
    basis, coefficients = dec.truncate(16)
    assert torch.isfinite(basis).all() and all(torch.isfinite(c).all() for c in coefficients)
    for w, c in zip(weights, coefficients, strict=True):
        torch.testing.assert_close(basis @ c, w, rtol=0, atol=1e-9 * float(w.abs().max()))


def test_the_path_is_chosen_by_shape():
    assert decomposition_path(4096, 2 * 11008, "auto") == "gram_eigh"  # up/gate, n = 2
    assert decomposition_path(11008, 2 * 4096, "auto") == "svd"  # down pair: 1.34 : 1
    assert decomposition_path(11008, 4096, "auto") == "gram_eigh"  # down, one layer
    assert decomposition_path(4096, 4096, "auto") == "svd"
    assert decomposition_path(4096, 4096, "gram_eigh") == "gram_eigh"
    with pytest.raises(ValueError, match="one of"):
        decomposition_path(4, 4, "qr")


def method(**kw):
    cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig), {"name": BasisSharing.name, **kw}
    )
    return BasisSharing(cfg)


def test_unknown_decomposition_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="Valid choices"):
        method(decomposition="qr").check_config(get_family("llama"))


@pytest.mark.parametrize("choice", ["gram_eigh", "auto"])
def test_compressed_models_agree_with_the_svd_path(choice):
    dense = make_tiny_model("llama", dtype=F64)
    family = family_for_model_type(dense.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_grams(dense, family, ids, 4, F64)
    logits = {}
    for path in ("svd", choice):
        model = copy.deepcopy(dense)
        ctx = CompressionContext(ratio=0.4, device=CPU, stats={"gram": stats})
        method(decomposition=path).compress(model, family, ctx)
        with torch.no_grad():
            logits[path] = model(input_ids=ids, use_cache=False).logits
    scale = float(logits["svd"].abs().max())
    torch.testing.assert_close(logits[choice], logits["svd"], rtol=0, atol=1e-8 * scale)
