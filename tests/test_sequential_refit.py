"""The error-compensating sequential refit (update=sequential, docs/methods.md §10.1): exact
least-squares oracles on tiny float64 models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import collect_grams, hooked_kinds
from basis_sharing.linalg.refit import (
    compensated_coefficients,
    compensated_error,
    refit_coefficients,
    refit_shared_basis,
)
from basis_sharing.methods.basis_sharing import BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.compensate import refit_compensating
from basis_sharing.methods.factorized import snapshot_weights
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import family_for_model_type
from basis_sharing.runtime.sequential import BlockRunner

F64 = torch.float64
CPU = torch.device("cpu")
EPS = 7e-6


# ---------------------------------------------------------------- linear algebra


def random_problem(seed: int, d_in: int = 10, k: int = 4, d_out: int = 7, tokens: int = 200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=F64)
    x_hat = x + 0.3 * torch.randn(tokens, d_in, generator=g, dtype=F64)
    basis = torch.randn(d_in, k, generator=g, dtype=F64)
    w = torch.randn(d_in, d_out, generator=g, dtype=F64)
    return x, x_hat, basis, w


def test_compensated_coefficients_are_the_least_squares_solution():
    x, x_hat, basis, w = random_problem(0)
    c = compensated_coefficients(basis, x_hat.T @ x_hat, x_hat.T @ x, w)
    oracle = torch.linalg.lstsq(x_hat @ basis, x @ w).solution
    torch.testing.assert_close(c, oracle, rtol=0, atol=1e-10)
    # Without deviation it is the plain refit.
    plain = compensated_coefficients(basis, x.T @ x, x.T @ x, w)
    torch.testing.assert_close(plain, refit_coefficients(basis, x.T @ x, w), rtol=0, atol=1e-10)


def test_compensated_error_is_the_direct_norm():
    x, x_hat, basis, w = random_problem(1)
    c = torch.randn(basis.shape[1], w.shape[1], generator=torch.Generator().manual_seed(2)).to(F64)
    got = compensated_error(x_hat.T @ x_hat, x_hat.T @ x, x.T @ x, w, basis, c)
    assert got == pytest.approx(
        float(torch.linalg.matrix_norm(x_hat @ basis @ c - x @ w)), rel=1e-9
    )


def test_compensated_refit_survives_a_basis_the_inputs_never_excite():
    x, x_hat, basis, w = random_problem(6, d_in=6, k=2)
    x_hat[:, 5] = 0.0
    basis = torch.zeros(6, 2, dtype=F64)
    basis[5, 0] = 1.0  # lives only on the dead feature
    basis[0, 1] = 1.0
    c = compensated_coefficients(basis, x_hat.T @ x_hat, x_hat.T @ x, w)
    assert torch.isfinite(c).all()


def test_shared_basis_als_is_monotone_and_beats_the_coefficient_refit():
    members = [random_problem(seed, d_in=12, k=3) for seed in (3, 4, 5)]
    basis = members[0][2]
    grams_hat = [xh.T @ xh for _, xh, _, _ in members]
    crosses = [xh.T @ x for x, xh, _, _ in members]
    grams = [x.T @ x for x, _, _, _ in members]
    weights = [w for _, _, _, w in members]
    start = [
        compensated_coefficients(basis, m, p, w)
        for m, p, w in zip(grams_hat, crosses, weights, strict=True)
    ]
    b, cs, history = refit_shared_basis(basis, start, grams_hat, crosses, weights, EPS, 5, 20)
    assert len(history) == 6
    assert all(
        later <= earlier + 1e-9 for earlier, later in zip(history, history[1:], strict=False)
    )
    assert history[-1] < history[0]
    # The history is the squared error less its constant sum_j tr(W_j^T M_j W_j).
    constant = sum(float((w * (m @ w)).sum()) for m, w in zip(grams, weights, strict=True))
    final = sum(
        compensated_error(*stats, w, b, c) ** 2
        for stats, w, c in zip(
            zip(grams_hat, crosses, grams, strict=True), weights, cs, strict=True
        )
    )
    assert final == pytest.approx(history[-1] + constant, rel=1e-9)
    coefficient_only = sum(
        compensated_error(*stats, w, basis, c) ** 2
        for stats, w, c in zip(
            zip(grams_hat, crosses, grams, strict=True), weights, start, strict=True
        )
    )
    assert coefficient_only == pytest.approx(history[0] + constant, rel=1e-9)


# ---------------------------------------------------------------- the update on tiny models


def compressed(family_name="llama", full_rank=False, **kw):
    """(dense model, compressed model, family, plans, originals, ctx); the update not run."""
    dense = make_tiny_model(family_name, dtype=F64)
    family = family_for_model_type(dense.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_grams(dense, family, ids, 4, F64)
    cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig), {"name": BasisSharing.name, **kw}
    )
    ctx = CompressionContext(
        ratio=0.5, device=CPU, calibration_ids=ids, calib_batch_size=4, stats={"gram": stats}
    )
    ctx.gram_dtype = F64
    method = BasisSharing(cfg)
    model = copy.deepcopy(dense)
    originals = snapshot_weights(model, family)  # before compressing
    plans = method.plan(model, family, ctx)
    if full_rank:
        plans = [dataclasses.replace(p, rank=p.full_rank) for p in plans]
        method.apply(model, family, plans, ctx)
    else:
        method.compress(model, family, ctx)
    return dense, model, family, plans, originals, ctx


def coefficient(model, family, i, kind):
    return family.module(family.layers(model)[i], kind).coefficient.weight.detach().T


def layer_inputs(model, family, layer_index, ids):
    """Per input name: the (tokens, d_in) activations layer ``layer_index`` reads (full model)."""
    layer = family.layers(model)[layer_index]
    got = {}
    handles = [
        family.module(layer, kind).register_forward_hook(
            lambda _m, args, _o, name=name: got.__setitem__(
                name, args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for name, kind in hooked_kinds(family).items()
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("family_name", ["llama", "qwen2"])
def test_full_rank_refit_reproduces_the_dense_model(family_name):
    dense, model, family, plans, originals, ctx = compressed(family_name, full_rank=True)
    info = refit_compensating(model, family, plans, originals, ctx, EPS, refit_basis=True)
    assert info["mode"] == "sequential" and info["tokens"] == ctx.calibration_ids.numel()
    ids = ctx.calibration_ids
    with torch.no_grad():
        want = dense(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, use_cache=False).logits
    # float64 roundoff through the full-rank k x k solves, whose Grams (a tiny random model's
    # 256 tokens) are ill-conditioned: 1.7e-8 of the largest logit measured on qwen2, 0 on llama.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * float(want.abs().max()))


@pytest.mark.parametrize("family_name", ["llama", "opt"])
def test_refit_never_increases_a_member_error(family_name):
    _, model, family, plans, originals, ctx = compressed(family_name)
    info = refit_compensating(model, family, plans, originals, ctx, EPS)
    members = [(g["kind"], m) for g in info["groups"] for m in g["members"]]
    assert len(members) == sum(len(p.layers) for p in plans)
    for _, m in members:
        assert m["error_after"] <= m["error_before"] * (1 + 1e-9)
    assert any(m["error_after"] < 0.99 * m["error_before"] for _, m in members if m["layer"] > 0)
    assert info["error_after"] < info["error_before"]
    # Layer 0's attention input is the same in both models (X^ = X): its kinds get the plain
    # least-squares refit on the original Gram, each member on its own.
    gram = ctx.stats["gram"].gram(0, "attn_in")
    for kind in family.kinds_by_input()["attn_in"]:
        module = family.module(family.layers(model)[0], kind)
        basis = module.basis.weight.detach().T
        oracle = refit_coefficients(basis, gram, originals[(0, kind)], EPS)
        torch.testing.assert_close(coefficient(model, family, 0, kind), oracle, rtol=0, atol=1e-9)


def test_a_singular_system_never_raises_a_member_error():
    """OPT's tiny init has zero LayerNorm biases: its attention Grams are singular, and at full
    rank so is B^T M^ B; a member the shifted solve would make worse keeps its coefficients."""
    _, model, family, plans, originals, ctx = compressed("opt", full_rank=True)
    info = refit_compensating(model, family, plans, originals, ctx, EPS)
    members = [m for g in info["groups"] for m in g["members"]]
    assert all(m["error_after"] <= m["error_before"] for m in members)
    assert any(m["error_after"] == m["error_before"] > 0 for m in members)


@pytest.mark.parametrize("refit_basis", [False, True])
def test_a_later_member_solves_the_least_squares_on_recomputed_activations(refit_basis):
    """X^ of input I of layer i comes from the model with layers < i refit (their bases too, when
    refit) and, in layer i, the kinds reading earlier inputs refit (data-flow order: o sees the
    refit q/k/v, down the refit up/gate), the rest as compressed; X from the dense model.
    Recomputed here with hooks on full forwards.

    Without a basis refit every kind of layer 3 is checked (the second layer of its unit: the
    states inside a unit). With one, layer 2's private attention-input kinds (k, v): the first
    layer after a unit whose shared bases moved, so its inputs must come from that unit's final
    weights (its later inputs depend on layer 2's own shared q, whose pre-ALS coefficients the
    final model no longer holds).
    """
    dense, model, family, plans, originals, ctx = compressed("llama")
    before = copy.deepcopy(model)
    before_refit = copy.deepcopy(model)
    info = refit_compensating(model, family, plans, originals, ctx, EPS, refit_basis=refit_basis)
    target = 2 if refit_basis else 3
    with torch.no_grad():  # the oracle model: layers < target as refit, the rest as compressed
        for i in range(target):
            for kind in family.kinds:
                coefficient(before, family, i, kind).copy_(coefficient(model, family, i, kind))
        for plan in plans:
            if plan.shared and max(plan.layers) < target:
                key = plan.basis_key
                before.shared_bases[key].weight.copy_(model.shared_bases[key].weight)
    ids = ctx.calibration_ids
    x = layer_inputs(dense, family, target, ids)
    stages = list(family.kinds_by_input().items())
    if refit_basis:
        stages = stages[:1]
        assert all(k in ("q", "k", "v") for k in stages[0][1])
    checked = []
    for name, readers in stages:
        x_hat = layer_inputs(before, family, target, ids)
        for kind in readers:
            plan = next(p for p in plans if target in p.layers and p.kind == kind)
            if refit_basis and plan.shared:
                continue
            checked.append(kind)
            basis = family.module(family.layers(before)[target], kind).basis.weight.detach().T
            want = x[name] @ originals[(target, kind)]
            oracle = torch.linalg.lstsq(x_hat[name] @ basis, want)
            got = coefficient(model, family, target, kind)
            torch.testing.assert_close(got, oracle.solution, rtol=1e-7, atol=1e-8)
            # The reported errors are the direct norms on these activations.
            (member,) = [
                m
                for g in info["groups"]
                if g["kind"] == kind
                for m in g["members"]
                if m["layer"] == target
            ]
            old_c = coefficient(before_refit, family, target, kind)
            for key, c in (("error_before", old_c), ("error_after", got)):
                direct = float(torch.linalg.matrix_norm(x_hat[name] @ basis @ c - want))
                assert member[key] == pytest.approx(direct, rel=1e-8), key
        with torch.no_grad():  # the next input sees this one's kinds refit
            for kind in readers:
                coefficient(before, family, target, kind).copy_(
                    coefficient(model, family, target, kind)
                )
    assert checked == (["k", "v"] if refit_basis else list(family.kinds))


def test_basis_refit_keeps_one_shared_tensor_and_lowers_the_group_error():
    _, model, family, plans, originals, ctx = compressed("llama")
    start = {k: v.weight.detach().clone() for k, v in model.shared_bases.items()}
    info = refit_compensating(model, family, plans, originals, ctx, EPS, refit_basis=True)
    layers = family.layers(model)
    shared = [p for p in plans if p.shared]
    assert shared
    for plan in shared:
        registry = model.shared_bases[plan.basis_key]
        for i in plan.layers:
            assert family.module(layers[i], plan.kind).basis is registry
        assert not torch.allclose(registry.weight, start[plan.basis_key])
    reports = [g for g in info["groups"] if len(g["layers"]) > 1]
    assert len(reports) == len(shared)
    for g in reports:
        history = g["als_objective"]
        assert len(history) == 3  # the C-step, then als_iterations=2 rounds
        assert all(
            later <= earlier + 1e-9 for earlier, later in zip(history, history[1:], strict=False)
        )
        assert g["error_after"] <= g["error_after_coefficients"] * (1 + 1e-9)
        assert g["error_after_coefficients"] <= g["error_before"] * (1 + 1e-9)
    # The first unit's statistics are those the ALS ran on: its errors strictly improve.
    assert reports[0]["error_after"] < reports[0]["error_after_coefficients"]


def test_the_runner_of_the_run_gives_the_same_numbers():
    results = []
    for runner in (False, True):
        _, model, family, plans, originals, ctx = compressed("llama")
        if runner:
            ctx.runner = BlockRunner(model, family, CPU)
        info = refit_compensating(model, family, plans, originals, ctx, EPS, refit_basis=True)
        results.append((info, model.state_dict()))
    (info_full, state_full), (info_runner, state_runner) = results
    assert info_full == info_runner
    assert state_full.keys() == state_runner.keys()
    for key, value in state_full.items():
        assert torch.equal(value, state_runner[key]), key


def test_samples_limit_the_calibration_blocks():
    _, model, family, plans, originals, ctx = compressed("llama")
    info = refit_compensating(model, family, plans, originals, ctx, EPS, samples=4)
    assert info["tokens"] == 4 * ctx.calibration_ids.shape[1]
    _, model_b, _, _, _, ctx_b = compressed("llama")
    ctx_b.calibration_ids = ctx_b.calibration_ids[:4]
    assert refit_compensating(model_b, family, plans, originals, ctx_b, EPS) == info


@pytest.mark.parametrize("refit_basis", [False, True])
def test_method_update_sequential_runs_the_compensating_refit(refit_basis):
    """``method.update=sequential`` (and its options) reach ``refit_compensating`` unchanged."""
    _, expected, family, plans, originals, ctx = compressed("llama", eps=EPS)
    want = refit_compensating(expected, family, plans, originals, ctx, EPS, refit_basis, samples=4)
    cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig),
        {"name": BasisSharing.name, "eps": EPS, "update": "sequential"},
        {"refit_basis": refit_basis, "refit_samples": 4},
    )
    method = BasisSharing(cfg)
    method.check_config(family)
    model = make_tiny_model("llama", dtype=F64)
    info = method.compress(model, family, ctx)
    assert info["update"] == want
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
