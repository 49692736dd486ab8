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


def _compress(family_name, **kw):
    model, family, method, ctx = setup(
        BasisSharing, BasisSharingMethodConfig, family_name, update="layerwise", **kw
    )
    originals = dense_weights(model, family)
    record = method.compress(model, family, ctx)
    return model, family, method, ctx, originals, record


def _relative(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize(("family_name", "refit_basis"), [("llama", False), ("opt", True)])
def test_control_refit_solves_on_the_control_variate_gram(family_name, refit_basis, monkeypatch):
    """refit_samples=4 of 8: every input's Gram the refit solves on is M_i + 2 (M^_i - M_i'),
    with M^_i and M_i' the finished compressed and the dense model's Grams on the 4 refit samples
    and M_i the calibration Gram on all 8 (the oracle, from three separate passes); each member's
    coefficients solve its least squares on it, and with refit_basis each first member's basis
    is the whitened truncation of it plus the later members' calibration Grams. The plain
    refit's Gram (2 M^_i) is another matrix."""
    seen = {}
    refit_kinds = update._refit_kinds

    def spy(layers, family, by_member, i, kinds, acc, *args):
        seen[(i, family.projection(kinds[0]).input)] = (acc.gram.clone(), acc.tokens)
        return refit_kinds(layers, family, by_member, i, kinds, acc, *args)

    monkeypatch.setattr(update, "_refit_kinds", spy)
    model, family, method, ctx, originals, record = _compress(
        family_name, refit_basis=refit_basis, refit_samples=4, refit_gram="control"
    )
    info = record["update"]
    assert info["refit_gram"] == "control" and info["tokens"] == 4 * 32
    calibration = ctx.stats["gram"]
    hat = collect_grams(model, family, ctx.calibration_ids[:4], 4, F64)
    dense = collect_grams(
        make_tiny_model(family_name, dtype=F64), family, ctx.calibration_ids[:4], 4, F64
    )
    assert calibration.tokens == 2 * hat.tokens == 2 * dense.tokens
    layers = family.layers(model)
    assert len(seen) == len(layers) * len(family.kinds_by_input())
    estimates = {}
    for (i, name), (gram, tokens) in seen.items():
        estimate = calibration.group_gram((i,), name) + 2.0 * (
            hat.group_gram((i,), name) - dense.group_gram((i,), name)
        )
        torch.testing.assert_close(gram, estimate, rtol=1e-10, atol=1e-10)
        assert tokens == calibration.tokens  # a full-sample Gram to the refit's scale rules
        estimates[(i, name)] = estimate
    plain = {key: 2.0 * hat.group_gram((key[0],), key[1]) for key in estimates}
    assert max(_relative(plain[key], estimates[key]) for key in estimates) > 1e-3
    ranks = {(p["kind"], tuple(p["layers"])): p["rank"] for p in record["groups"]}
    rederived = 0
    for report in info["groups"]:
        (i,) = report["layers"]
        kind, name = report["kind"], family.projection(report["kind"]).input
        members = tuple(report.get("group", report["layers"]))
        module = family.module(layers[i], kind)
        basis = module.basis.weight.detach().T.to(F64)
        w = concat_weights([originals[(i, kind)]])
        oracle = refit_coefficients(basis, estimates[(i, name)], w, method.cfg.eps)
        torch.testing.assert_close(module.coefficient.weight.detach().T, oracle)
        if refit_basis and i == members[0] and len(members) > 1:
            assert report["basis_refit"]
            joint = estimates[(i, name)] + calibration.group_gram(members[1:], name)
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


def test_controlled_gram_is_the_control_variate_estimate():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 5, generator=g, dtype=F64)
    subset = full[:16]
    deviation = 0.1 * torch.randn(16, 5, generator=g, dtype=F64)
    hat, dense = GramAccumulator(F64), GramAccumulator(F64)
    hat.add(subset + deviation)
    dense.add(subset)
    got = controlled_gram(hat, dense, full.T @ full, 64)
    expected = full.T @ full + 4.0 * (
        (subset + deviation).T @ (subset + deviation) - subset.T @ subset
    )
    torch.testing.assert_close(got.gram, expected, rtol=1e-12, atol=1e-12)
    assert got.tokens == 64
    other = GramAccumulator(F64)
    other.add(subset[:8])
    with pytest.raises(ValueError, match="same tokens"):
        controlled_gram(hat, other, full.T @ full, 64)


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
