"""SVD, FWSVD and ASVD through the shared machinery, against independent oracles."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.params import count_projection_weights
from basis_sharing.methods.asvd import ASVD, ASVDMethodConfig, choose_threshold, kept_rank
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.methods.fwsvd import FWSVD, FWSVDMethodConfig
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.methods.svd import SVD, SVDMethodConfig
from basis_sharing.models.families import family_for_model_type

CPU = torch.device("cpu")
F64 = torch.float64


def build(cls, schema, **kw):
    return cls(OmegaConf.merge(OmegaConf.structured(schema), {"name": cls.name, **kw}))


def tiny(family_name: str = "llama"):
    model = make_tiny_model(family_name, dtype=F64)
    return model, family_for_model_type(model.config.model_type)


def fake_fisher(model, family, seed: int = 0):
    """Positive row importances for every (layer, kind), as FisherStats holds them."""
    g = torch.Generator().manual_seed(seed)
    rows = {
        (i, k): torch.rand(family.shape(layer, k)[0], generator=g, dtype=F64) + 0.1
        for i, layer in enumerate(family.layers(model))
        for k in family.kinds
    }
    return SimpleNamespace(rows=rows)


def fake_scales(model, family, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = {}
    for i, layer in enumerate(family.layers(model)):
        for k in family.kinds:
            table[(i, family.projection(k).input)] = (
                torch.rand(family.shape(layer, k)[0], generator=g, dtype=F64) + 0.05
            )
    return SimpleNamespace(
        scale=lambda layer, inp, how: table[(layer, inp)] * (2.0 if how == "abs_max" else 1.0)
    )


def ctx(ratio: float = 0.3, **stats) -> CompressionContext:
    return CompressionContext(ratio=ratio, device=CPU, stats=stats)


def product(module) -> torch.Tensor:
    return (module.basis.weight.T @ module.coefficient.weight.T).detach()


def weights(model, family):
    return {
        (i, k): family.weight(layer, k).detach().clone()
        for i, layer in enumerate(family.layers(model))
        for k in family.kinds
    }


@pytest.mark.parametrize("family_name", ["llama", "mistral", "opt", "gpt2"])
def test_svd_at_full_rank_reproduces_the_logits(family_name):
    model, family = tiny(family_name)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        dense = model(ids).logits
    svd = build(SVD, SVDMethodConfig)
    assert not svd.needs_calibration
    plans = [dataclasses.replace(p, rank=p.full_rank) for p in svd.plan(model, family, ctx())]
    svd.apply(model, family, plans, ctx())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=1e-8)


def test_svd_error_is_the_eckart_young_bound():
    model, family = tiny("opt")
    original = weights(model, family)
    info = build(SVD, SVDMethodConfig).compress(model, family, ctx(0.4))
    assert count_projection_weights(model, family) == info["planned_params"]["kept"]
    for (i, kind), w in original.items():
        module = family.module(family.layers(model)[i], kind)
        sigma = torch.linalg.svdvals(w)
        bound = sigma[module.rank :].pow(2).sum().sqrt()
        error = torch.linalg.matrix_norm(w - product(module).detach())
        assert float(error) == pytest.approx(float(bound), rel=1e-9, abs=1e-12)
        d_in, d_out = w.shape
        assert module.rank == d_in * d_out * 6 // 10 // (d_in + d_out)


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_fwsvd_scaling_is_undone_in_the_stored_factors(family_name):
    model, family = tiny(family_name)
    original = weights(model, family)
    fisher = fake_fisher(model, family)
    method = build(FWSVD, FWSVDMethodConfig)
    assert method.needs_calibration and method.stats_needed == {"fisher"}
    full = [
        dataclasses.replace(p, rank=p.full_rank)
        for p in method.plan(model, family, ctx(fisher=fisher))
    ]
    full_model, _ = tiny(family_name)
    method.apply(full_model, family, full, ctx(fisher=fisher))
    method.compress(model, family, ctx(0.3, fisher=fisher))
    for (i, kind), w in original.items():
        torch.testing.assert_close(
            product(family.module(family.layers(full_model)[i], kind)), w, rtol=0, atol=1e-10
        )
        scale = torch.sqrt(fisher.rows[(i, kind)] + 1e-5)
        U, s, Vh = torch.linalg.svd(scale[:, None] * w, full_matrices=False)
        k = family.module(family.layers(model)[i], kind).rank
        oracle = (U[:, :k] * s[:k] / scale[:, None]) @ Vh[:k]
        torch.testing.assert_close(
            product(family.module(family.layers(model)[i], kind)), oracle, rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("how", ["abs_mean", "abs_max"])
def test_asvd_uniform_scaling_is_undone_in_the_stored_factors(how):
    model, family = tiny("mistral")
    original = weights(model, family)
    scales = fake_scales(model, family)
    method = build(ASVD, ASVDMethodConfig, allocation="uniform", scale=how, alpha=0.5)
    info = method.compress(model, family, ctx(0.3, scale=scales))
    assert info["allocation"] == "uniform" and info["sensitivity_ppl"] is None
    for (i, kind), w in original.items():
        module = family.module(family.layers(model)[i], kind)
        d = scales.scale(i, family.projection(kind).input, how).pow(0.5) + 1e-6
        U, s, Vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)
        k = kept_rank(*w.shape, 0.7)
        assert module.rank == k
        oracle = (U[:, :k] * s[:k] / d[:, None]) @ Vh[:k]
        torch.testing.assert_close(product(module), oracle, rtol=0, atol=1e-10)


def test_threshold_search_on_a_hand_table():
    shapes = {(0, "q"): (10, 10), (0, "o"): (10, 10)}
    table = {
        (0, "q"): {0.4: 30.0, 0.6: 12.0, 0.8: 10.5},
        (0, "o"): {0.4: 11.0, 0.6: 10.2, 0.8: 10.1},
    }
    # o tolerates 0.4 at a small perplexity cost, q does not: the budget goes to q.
    kept = lambda r: kept_rank(10, 10, r) * 20  # noqa: E731
    alloc = choose_threshold(table, shapes, target_kept=kept(0.6) + kept(0.4))
    assert alloc == {(0, "q"): 0.6, (0, "o"): 0.4}  # threshold 12.0 is the lowest that fits
    assert choose_threshold(table, shapes, 10**6) == {(0, "q"): 1.0, (0, "o"): 1.0}  # all dense
    assert choose_threshold(table, shapes, 199) == {(0, "q"): 1.0, (0, "o"): 0.8}
    with pytest.raises(ConfigError, match="cannot reach the target"):
        choose_threshold(table, shapes, target_kept=kept(0.4) * 2 - 1)


def test_asvd_sensitivity_meets_the_target_and_records_ranks():
    model, family = tiny("llama")
    dense = sum(
        a * b
        for a, b in (family.shape(layer, k) for layer in family.layers(model) for k in family.kinds)
    )
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(3))
    c = ctx(0.3, scale=fake_scales(model, family))
    c.calibration_ids, c.calib_batch_size = ids, 2
    method = build(ASVD, ASVDMethodConfig, sensitivity_samples=2)
    info = method.compress(model, family, c)
    kept = count_projection_weights(model, family)
    assert kept == info["planned_params"]["kept"] <= 0.7 * dense
    assert len(info["sensitivity_ppl"]) == 4 * len(family.kinds)
    assert all(len(row) == 6 for row in info["sensitivity_ppl"].values())
    ranks = {(g["layers"][0], g["kind"]): g["rank"] for g in info["groups"]}
    assert len(set(ranks.values())) > 1  # not uniform: sensitivity moved the budget around


def test_asvd_sensitivity_is_measured_once_per_sweep(monkeypatch):
    from basis_sharing.methods import asvd

    calls = []
    original = asvd.ASVD.sensitivity
    monkeypatch.setattr(
        asvd.ASVD, "sensitivity", lambda self, *a: calls.append(1) or original(self, *a)
    )
    caches = SweepCaches()  # this test owns them, as run.py's process does for a -m sweep
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    ranks = []
    for ratio in (0.3, 0.5):
        model, family = tiny("llama")
        c = ctx(ratio, scale=fake_scales(model, family))
        c.calibration_ids, c.calib_batch_size = ids, 2
        c.stats_key = "sweep"
        c.caches = caches
        info = build(ASVD, ASVDMethodConfig, sensitivity_samples=2).compress(model, family, c)
        ranks.append(info["planned_params"]["kept"])
    assert len(calls) == 1 and ranks[1] < ranks[0]
    assert len(caches.sensitivity) == 1  # one table for the calibration setup, in its owner
