"""update=layerwise refit_gram=control: the deviated Grams as control-variate estimates
M + (N / n)(M^_n - M_n) on the calibration Gram M (basis_sharing/methods/control.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf
from test_update import dense_weights, setup

from basis_sharing.calibration.grams import GramAccumulator, collect_grams
from basis_sharing.errors import ConfigError
from basis_sharing.linalg.factorization import concat_weights, decompose_shared
from basis_sharing.linalg.refit import refit_coefficients
from basis_sharing.linalg.whitening import whiten
from basis_sharing.methods import update
from basis_sharing.methods.basis_sharing import BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.control import controlled_gram
from basis_sharing.models.families import get_family

F64 = torch.float64


def _compress(family_name, samples=8, ratio=0.5, **kw):
    model, family, method, ctx = setup(
        BasisSharing,
        BasisSharingMethodConfig,
        family_name,
        update="layerwise",
        samples=samples,
        **kw,
    )
    ctx.ratio = ratio
    originals = dense_weights(model, family)
    record = method.compress(model, family, ctx)
    return model, family, method, ctx, originals, record


def _relative(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize(("family_name", "refit_basis"), [("llama", False), ("opt", True)])
def test_control_refit_solves_on_the_control_variate_gram(family_name, refit_basis, monkeypatch):
    """refit_samples=48 of 64: every input's Gram the refit solves on is M_i + 4/3 (M^_i - M_i'),
    with M^_i and M_i' the finished compressed and the dense model's Grams on the 48 refit samples
    and M_i the calibration Gram on all 64 (the oracle, from three separate passes), or, where
    that estimate is not positive definite, the plain 4/3 M^_i (and the record lists it); each
    member's coefficients solve its least squares on it, and with refit_basis each first
    member's basis is the whitened truncation of it plus the later members' calibration Grams."""
    seen = {}
    refit_kinds = update._refit_kinds

    def spy(layers, family, by_member, i, kinds, acc, *args):
        seen[(i, family.projection(kinds[0]).input)] = (acc.gram.clone(), acc.tokens)
        return refit_kinds(layers, family, by_member, i, kinds, acc, *args)

    monkeypatch.setattr(update, "_refit_kinds", spy)
    model, family, method, ctx, originals, record = _compress(
        family_name,
        refit_basis=refit_basis,
        refit_samples=48,
        refit_gram="control",
        samples=64,
        ratio=0.2,
    )
    info = record["update"]
    assert info["refit_gram"] == "control" and info["tokens"] == 48 * 32
    calibration = ctx.stats["gram"]
    ids = ctx.calibration_ids[:48]
    hat = collect_grams(model, family, ids, 4, F64)
    dense = collect_grams(make_tiny_model(family_name, dtype=F64), family, ids, 4, F64)
    scale = calibration.tokens / hat.tokens
    assert scale == 64 / 48 and hat.tokens == dense.tokens
    layers = family.layers(model)
    assert len(seen) == len(layers) * len(family.kinds_by_input())
    fallbacks = {tuple(f) for f in info["control_fallbacks"]}
    grams, controlled = {}, 0
    for (i, name), (gram, tokens) in seen.items():
        deviated = scale * hat.group_gram((i,), name)
        estimate = calibration.group_gram((i,), name) + scale * (
            hat.group_gram((i,), name) - dense.group_gram((i,), name)
        )
        definite = int(torch.linalg.cholesky_ex(estimate).info) == 0
        assert ((i, name) not in fallbacks) == definite
        grams[(i, name)] = estimate if definite else deviated
        torch.testing.assert_close(gram, grams[(i, name)], rtol=1e-10, atol=1e-10)
        assert tokens == calibration.tokens  # a full-sample Gram to the refit's scale rules
        if definite and (i, name) != (0, family.projection(family.kinds[0]).input):
            controlled += 1  # not the first layer's input, where M^ = M
            assert _relative(deviated, estimate) > 1e-3
    assert controlled > 0 and fallbacks  # both cases ran
    ranks = {(p["kind"], tuple(p["layers"])): p["rank"] for p in record["groups"]}
    rederived = 0
    for report in info["groups"]:
        (i,) = report["layers"]
        kind, name = report["kind"], family.projection(report["kind"]).input
        members = tuple(report.get("group", report["layers"]))
        module = family.module(layers[i], kind)
        basis = module.basis.weight.detach().T.to(F64)
        w = concat_weights([originals[(i, kind)]])
        oracle = refit_coefficients(basis, grams[(i, name)], w, method.cfg.eps)
        torch.testing.assert_close(module.coefficient.weight.detach().T, oracle)
        if refit_basis and i == members[0] and len(members) > 1:
            assert report["basis_refit"]
            joint = grams[(i, name)] + calibration.group_gram(members[1:], name)
            white = whiten(joint, "cholesky", eps=method.cfg.eps)
            dec = decompose_shared([originals[(j, kind)] for j in members], white.S, 0.0)
            oracle, _ = dec.truncate(ranks[(kind, members)])
            signs = torch.sign((basis * oracle).sum(dim=0))
            torch.testing.assert_close(basis, oracle * signs, rtol=1e-6, atol=1e-8)
            rederived += 1
    assert rederived > 0 or not refit_basis


@pytest.mark.parametrize("refit_basis", [False, True])
def test_control_on_every_sample_is_the_plain_refit(refit_basis):
    """With n = N the estimate is M + M^_N - M_N = M^_N: the same model as refit_gram=sample
    (to the rounding of the two Grams' difference)."""
    plain, family, *_ = _compress("llama", refit_basis=refit_basis)
    control, *_ = _compress("llama", refit_basis=refit_basis, refit_gram="control")
    for a, b in zip(plain.state_dict().values(), control.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_controlled_gram_is_the_control_variate_estimate_unless_indefinite():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 5, generator=g, dtype=F64)
    subset = full[:16]
    deviation = 0.1 * torch.randn(16, 5, generator=g, dtype=F64)
    hat, dense = GramAccumulator(F64), GramAccumulator(F64)
    hat.add(subset + deviation)
    dense.add(subset)
    got, controlled = controlled_gram(hat, dense, full.T @ full, 64)
    deviated = (subset + deviation).T @ (subset + deviation)
    expected = full.T @ full + 4.0 * (deviated - subset.T @ subset)
    torch.testing.assert_close(got.gram, expected, rtol=1e-12, atol=1e-12)
    assert controlled and got.tokens == 64
    # The refit samples hold most of the calibration's energy along the last feature and the
    # compressed model removes it there: M + 4 (M^_n - M_n) has a negative eigenvalue, and the
    # plain estimate 4 M^_n stands.
    full[:16, 4] *= 3.0
    dense = hat_of(subset)
    flat = hat_of(subset * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=F64))
    got, controlled = controlled_gram(flat, dense, full.T @ full, 64)
    assert not controlled and got.tokens == 64
    assert torch.linalg.eigvalsh(expected_of(full, flat, dense))[0] < 0
    torch.testing.assert_close(got.gram, 4.0 * flat.gram, rtol=0, atol=0)
    other = GramAccumulator(F64)
    other.add(subset[:8])
    with pytest.raises(ValueError, match="same tokens"):
        controlled_gram(hat, other, full.T @ full, 64)


def hat_of(x):
    acc = GramAccumulator(F64)
    acc.add(x)
    return acc


def expected_of(full, hat, dense):
    return full.T @ full + 4.0 * (hat.gram - dense.gram)


def test_refit_gram_settings_are_checked_before_any_work():
    llama = get_family("llama")

    def method(**kw):
        schema = OmegaConf.structured(BasisSharingMethodConfig)
        return BasisSharing(OmegaConf.merge(schema, {"name": "basis_sharing", **kw}))

    with pytest.raises(ConfigError, match="Valid choices: control, sample"):
        method(update="layerwise", refit_gram="half").check_config(llama)
    for mode in ("one_pass", "sequential", "none"):
        with pytest.raises(ConfigError, match="refit_gram=control is an option of"):
            method(update=mode, refit_gram="control").check_config(llama)
    method(update="layerwise", refit_samples=16, refit_gram="control").check_config(llama)
