"""The whitened methods' choices beyond the papers (docs/methods.md §10): eigen whitening, global
rank allocation, the automatic sharing choice and the update names."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import GramStats, collect_grams
from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.params import count_projection_weights, dense_projection_weights
from basis_sharing.linalg.allocation import allocate_ranks
from basis_sharing.linalg.factorization import decompose_shared, shared_rank
from basis_sharing.linalg.whitening import eigh_whitening_factor, unwhiten, whitening_factor
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.options import update_mode
from basis_sharing.methods.plan import planned_params
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import family_for_model_type, get_family

F64 = torch.float64
CPU = torch.device("cpu")


def method(name: str = "basis_sharing", **kw):
    schema = BasisSharingMethodConfig if name == "basis_sharing" else WhitenedSVDMethodConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **kw})
    return BasisSharing(cfg) if name == "basis_sharing" else SVDLLM(cfg)


def setup(family_name: str = "llama", seed: int = 0):
    model = make_tiny_model(family_name, dtype=F64, seed=seed)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(seed))
    return model, family, collect_grams(model, family, ids, 4, F64)


def ctx(stats, ratio: float = 0.3) -> CompressionContext:
    return CompressionContext(ratio=ratio, device=CPU, stats={"gram": stats})


def spd(d: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    """A symmetric positive definite matrix with condition number ``cond``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.logspace(0, math.log10(cond), d, dtype=F64)
    return q @ torch.diag(lam) @ q.T


# ---- eigen whitening ---------------------------------------------------------------------------


def test_eigh_factor_whitens_and_inverts_exactly():
    m = spd(12, 0)
    w = eigh_whitening_factor(m, eps=1e-9)
    torch.testing.assert_close(w.S.T @ w.S, m, rtol=0, atol=1e-12)
    assert w.kind == "eigh" and w.clamped == 0 and w.shift == 0.0
    y = torch.randn(12, 5, dtype=F64)
    torch.testing.assert_close(
        unwhiten(w.S, y, "eigh"), torch.linalg.solve(w.S, y), atol=1e-12, rtol=0
    )


def test_eigh_clamps_a_singular_gram_instead_of_shifting_it():
    x = torch.randn(50, 8, dtype=F64)
    x[:, 7] = 0.0  # a dead input feature
    w = eigh_whitening_factor(x.T @ x, eps=1e-6)
    assert w.clamped == 1 and w.shift == pytest.approx(1e-6, rel=1e-3)
    lam = torch.linalg.eigvalsh(w.S.T @ w.S)
    torch.testing.assert_close(lam[1:], torch.linalg.eigvalsh(x.T @ x)[1:], rtol=1e-10, atol=1e-9)


def test_eigh_truncation_equals_the_cholesky_one_on_a_well_conditioned_gram():
    g = torch.Generator().manual_seed(3)
    m = spd(16, 1, cond=20.0)
    weights = [torch.randn(16, 24, generator=g, dtype=F64) for _ in range(2)]
    chol = decompose_shared(weights, whitening_factor(m, 1e-9).S)
    eig = decompose_shared(weights, eigh_whitening_factor(m, 1e-9).S, whitening="eigh")
    torch.testing.assert_close(eig.sigma, chol.sigma, rtol=1e-10, atol=0)
    for k in (3, 8, 16):
        (bc, cc), (be, ce) = chol.truncate(k), eig.truncate(k)
        for c1, c2 in zip(cc, ce, strict=True):
            torch.testing.assert_close(be @ c2, bc @ c1, rtol=0, atol=1e-9)


def test_eigh_whitening_runs_through_the_method():
    model, family, stats = setup()
    info = method(whitening="eigh").compress(model, family, ctx(stats))
    assert info["whitening"] == "eigh"
    with pytest.raises(ConfigError, match="Valid choices: cholesky, eigh"):
        method(whitening="eig").check_config(family)


# ---- global allocation -------------------------------------------------------------------------


def test_allocation_takes_the_most_energy_per_weight():
    spectra = [torch.tensor([10.0, 1.0, 0.5]), torch.tensor([4.0, 3.0, 2.0])]
    # scores: g0: 100/2, 1/2, .25/2; g1: 16/1, 9/1, 4/1 -> order g0[0], g1[0], g1[1], g1[2], g0[1]
    assert allocate_ranks(spectra, [2, 1], [3, 3], budget=5, min_rank=0) == [1, 3]
    assert allocate_ranks(spectra, [2, 1], [3, 3], budget=7, min_rank=0) == [2, 3]
    # g0's second component does not fit in 6: its group closes, the budget is not exceeded
    assert allocate_ranks(spectra, [2, 1], [3, 3], budget=6, min_rank=0) == [1, 3]
    with pytest.raises(ValueError, match="minimum rank"):
        allocate_ranks(spectra, [2, 1], [3, 3], budget=2, min_rank=1)


def test_normalised_allocation_compares_fractions_of_each_group_s_energy():
    big, small = torch.tensor([100.0, 10.0]), torch.tensor([1.0, 0.9])
    plain = allocate_ranks([big, small], [1, 1], [2, 2], budget=2, min_rank=0)
    normalised = allocate_ranks([big, small], [1, 1], [2, 2], budget=2, min_rank=0, normalize=True)
    assert plain == [2, 0] and normalised == [1, 1]


def test_equal_spectra_give_the_uniform_ranks():
    sigma = torch.linspace(5, 1, 40, dtype=F64)
    for k in (1, 7, 23):
        assert allocate_ranks([sigma] * 6, [30] * 6, [40] * 6, budget=6 * k * 30) == [k] * 6


@pytest.mark.parametrize("scope", ["kind", "all"])
@pytest.mark.parametrize("normalize", [False, True])
def test_global_allocation_meets_the_budget_and_counts_what_it_plans(scope, normalize):
    model, family, stats = setup()
    dense = dense_projection_weights(model, family)
    m = method(allocation="global", allocation_scope=scope, allocation_normalize=normalize)
    plans = m.plan(model, family, ctx(stats, 0.3))
    uniform = method().plan(model, family, ctx(stats, 0.3))
    assert [(p.kind, p.layers) for p in plans] == [(p.kind, p.layers) for p in uniform]
    assert [p.rank for p in plans] != [p.rank for p in uniform]  # the spectra differ
    m.compress(model, family, ctx(stats, 0.3))
    kept = count_projection_weights(model, family)
    assert kept == planned_params(plans, dense)["kept"]
    # the uniform plan's budget, filled up to less than one component per group
    uniform_kept = planned_params(uniform, dense)["kept"]
    assert uniform_kept - sum(p.d_in + len(p.layers) * p.d_out for p in plans) < kept
    assert kept <= uniform_kept
    if scope == "kind":
        for kind in family.kinds:
            mine = [p for p in plans if p.kind == kind]
            assert sum(p.params for p in mine) <= sum(p.params for p in uniform if p.kind == kind)


def test_global_allocation_of_identical_layers_equals_the_uniform_plan():
    """Every group with the same spectrum: the allocation cannot prefer one."""
    model, family, _ = setup()
    layers = family.layers(model)
    with torch.no_grad():
        for layer in layers[1:]:
            layer.load_state_dict(layers[0].state_dict())
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    grams = {}
    for name, width in (("attn_in", d), ("attn_out", d), ("mlp_in", d), ("mlp_hidden", 128)):
        x = torch.randn(500, width, generator=g, dtype=F64)
        for i in range(len(layers)):
            grams[(i, name)] = x.T @ x
    stats = GramStats(grams=grams, tokens=500, dtype="float64")
    for ratio in (0.2, 0.5):
        uniform = method(group_size=1).plan(model, family, ctx(stats, ratio))
        glob = method(group_size=1, allocation="global").plan(model, family, ctx(stats, ratio))
        assert [p.rank for p in glob] == [p.rank for p in uniform]


def test_min_rank_too_large_for_the_budget_is_refused():
    model, family, stats = setup()
    with pytest.raises(ConfigError, match="lower method.min_rank"):
        method(allocation="global", min_rank=60).plan(model, family, ctx(stats, 0.5))


# ---- automatic sharing -------------------------------------------------------------------------


def low_rank_layers(model, family, ratio: float, seed: int) -> None:
    """Every projection W_i = A_i B_i of the private rank at ``ratio``, independent subspaces."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in family.layers(model):
            for kind in family.kinds:
                d_in, d_out = family.shape(layer, kind)
                r = shared_rank(d_in, d_out, 1, ratio)
                a = torch.randn(d_in, r, generator=g, dtype=F64)
                b = torch.randn(r, d_out, generator=g, dtype=F64)
                family.module(layer, kind).weight.copy_((a @ b).T / d_in)


def test_auto_shares_identical_layers_and_keeps_unrelated_ones_private():
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(5))
    same, family, _ = setup(seed=0)
    layers = family.layers(same)
    with torch.no_grad():
        for layer in layers[1:]:
            layer.load_state_dict(layers[0].state_dict())
    same_stats = collect_grams(same, family, ids, 4, F64)
    chosen = method(shared="auto").compress(same, family, ctx(same_stats, 0.4))
    assert {r["kind"]: r["choice"] for r in chosen["sharing"]} == dict.fromkeys(
        family.kinds, "shared"
    )
    assert set(chosen["shared_kinds"]) == set(family.kinds)

    # Unrelated layers, each of exactly the private rank: one basis per layer is exact, a shared
    # basis of the same budget cannot hold two layers' independent subspaces.
    unrelated, _, _ = setup(seed=1)
    low_rank_layers(unrelated, family, 0.4, seed=2)
    stats = collect_grams(unrelated, family, ids, 4, F64)
    chosen = method(shared="auto").compress(unrelated, family, ctx(stats, 0.4))
    report = {r["kind"]: r for r in chosen["sharing"]}
    assert {k: r["choice"] for k, r in report.items()} == dict.fromkeys(family.kinds, "private")
    assert chosen["shared_kinds"] == [] and set(chosen["private_kinds"]) == set(family.kinds)
    for r in report.values():
        assert r["error_private"] < 1e-6 * r["error_shared"]
        # the same budget either way, up to the rank rule's rounding (coarse at these widths)
        assert r["params_shared"] == pytest.approx(r["params_private"], rel=0.1)


def test_auto_rule_candidates_decide_only_the_rule_s_shared_kinds():
    # Identical layers: auto over every kind shares all seven; with auto_candidates=rule only the
    # kinds the family shares after the GQA rule (tiny llama: k/v are 64 -> 32, narrow) are
    # decided, with the very errors of the full choice, and the rest stay private untried.
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(5))
    reports = {}
    for candidates in ("all", "rule"):
        model, family, _ = setup(seed=0)
        layers = family.layers(model)
        with torch.no_grad():
            for layer in layers[1:]:
                layer.load_state_dict(layers[0].state_dict())
        stats = collect_grams(model, family, ids, 4, F64)
        bs = method(shared="auto", auto_candidates=candidates)
        info = bs.compress(model, family, ctx(stats, 0.4))
        reports[candidates] = {r["kind"]: r for r in info["sharing"]}
        kinds = (set(info["shared_kinds"]), set(info["private_kinds"]))
        reports[candidates]["kinds"] = kinds
    rule_shared = {"q", "up", "gate"}
    assert set(family.shared) - {"k", "v"} == rule_shared  # llama's default less the GQA rule
    assert reports["all"]["kinds"] == (set(family.kinds), set())
    assert reports["rule"]["kinds"] == (rule_shared, set(family.kinds) - rule_shared)
    for kind in family.kinds:
        rule = reports["rule"][kind]
        if kind in rule_shared:
            assert rule == reports["all"][kind] and rule["choice"] == "shared"
        else:
            assert rule == {"kind": kind, "choice": "private", "by_rule": True}


def test_auto_candidates_are_checked():
    with pytest.raises(ConfigError, match="all, rule|'all', 'rule'"):
        method(shared="auto", auto_candidates="paper").check_config(get_family("llama"))
    with pytest.raises(ConfigError, match="option of method.shared=auto"):
        method(auto_candidates="rule").check_config(get_family("llama"))
    method(shared="auto", auto_candidates="rule").check_config(get_family("llama"))


def test_auto_errors_are_each_member_s_own_output_error():
    model, family, stats = setup()
    layers = family.layers(model)
    originals = {
        (i, k): family.weight(layers[i], k).detach().clone()
        for i in range(len(layers))
        for k in family.kinds
    }
    info = method(shared="auto").compress(model, family, ctx(stats, 0.4))
    # recompute the error of the chosen side from the installed modules and the member Grams
    for r in info["sharing"]:
        total = 0.0
        for i, layer in enumerate(family.layers(model)):
            module = family.module(layer, r["kind"])
            approx = (module.basis.weight.T @ module.coefficient.weight.T).detach()
            delta = originals[(i, r["kind"])] - approx
            gram = stats.gram(i, family.projection(r["kind"]).input)
            total += float((delta * (gram @ delta)).sum())
        chosen = r["error_shared"] if r["choice"] == "shared" else r["error_private"]
        assert total == pytest.approx(chosen, rel=1e-8)


def test_auto_has_no_shape_plan_and_refuses_a_private_list():
    model, family, _ = setup()
    assert method(shared="auto").shape_plan(model, family, 0.3) is None
    with pytest.raises(ConfigError, match="leave method.private unset"):
        method(shared="auto", private=["o"]).check_config(get_family("llama"))
    with pytest.raises(ConfigError, match="or auto"):
        method(shared="sometimes").check_config(get_family("llama"))


# ---- update names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "mode"),
    [
        ("basis_sharing", True, "one_pass"),
        ("svd_llm", True, "layerwise"),
        ("basis_sharing", "true", "one_pass"),
        ("svd_llm", False, "none"),
        ("svd_llm", "False", "none"),
        ("svd_llm", "one_pass", "one_pass"),
        ("basis_sharing", "Sequential", "sequential"),
    ],
)
def test_update_names(name, value, mode):
    assert update_mode(name, value) == mode


def test_bad_update_settings_are_refused_before_any_work():
    llama = get_family("llama")
    with pytest.raises(ConfigError, match="Valid choices"):
        method(update="twice").check_config(llama)
    with pytest.raises(ConfigError, match="sequential or layerwise"):
        method(update="one_pass", refit_basis=True).check_config(llama)
    method(update="layerwise", refit_basis=True).check_config(llama)
    with pytest.raises(ConfigError, match="sequential or layerwise"):
        method(update="one_pass", refit_samples=8).check_config(llama)
    method("svd_llm", update=True, refit_samples=8).check_config(llama)  # layerwise
    with pytest.raises(ConfigError, match="refit_samples=0 must be >= 1"):
        method(update="sequential", refit_samples=0).check_config(llama)
    method(update="sequential", refit_basis=True, refit_samples=4).check_config(llama)
    method("svd_llm", update="sequential").check_config(llama)
    method("svd_llm", update="layerwise").check_config(llama)
    method(group_size=1, update="layerwise").check_config(llama)
    method(update="layerwise").check_config(llama)  # shared groups: member by member
