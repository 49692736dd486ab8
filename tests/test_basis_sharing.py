"""Basis Sharing and SVD-LLM on tiny in-code models of every family."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import collect_grams
from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.params import count_projection_weights, dense_projection_weights
from basis_sharing.linalg.factorization import decompose_shared
from basis_sharing.linalg.whitening import whitening_factor
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.plan import layer_groups, resolve_kinds
from basis_sharing.models.families import family_for_model_type, get_family
from basis_sharing.modules import LowRankLinear, SharedBasisLinear

FAMILIES = ["llama", "mistral", "opt", "gpt2", "llama3", "qwen2", "gemma2"]
CPU = torch.device("cpu")


def method(name: str = "basis_sharing", **kw):
    schema = BasisSharingMethodConfig if name == "basis_sharing" else WhitenedSVDMethodConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **kw})
    return BasisSharing(cfg) if name == "basis_sharing" else SVDLLM(cfg)


def setup(family_name: str, seed: int = 0):
    model = make_tiny_model(family_name, dtype=torch.float64, seed=seed)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(seed))
    stats = collect_grams(model, family, ids, batch_size=4, accumulate_dtype=torch.float64)
    return model, family, stats


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family_name", FAMILIES)
def test_full_rank_reproduces_the_dense_logits(family_name):
    model, family, stats = setup(family_name)
    probe = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(9))
    dense = logits(model, probe)
    bs = method(group_size=2)
    plans = [
        dataclasses.replace(p, rank=p.full_rank) for p in bs.plan(model, family, _ctx(stats, 0.2))
    ]
    bs.apply(model, family, plans, _ctx(stats))
    torch.testing.assert_close(logits(model, probe), dense, rtol=0, atol=1e-8)
    assert any(
        isinstance(family.module(family.layers(model)[0], k), SharedBasisLinear)
        for k in family.kinds
    )


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("ratio,group_size", [(0.3, 2), (0.5, 3)])
def test_planned_parameters_equal_the_counted_ones(family_name, ratio, group_size):
    model, family, stats = setup(family_name)
    dense = dense_projection_weights(model, family)
    bs = method(group_size=group_size)
    plans = bs.plan(model, family, _ctx(stats, ratio))
    info = bs.apply(model, family, plans, _ctx(stats))
    assert count_projection_weights(model, family) == info["planned_params"]["kept"]
    assert info["planned_params"]["dense"] == dense
    # Each shared basis is counted once: the registry holds one per shared group.
    shared_groups = [p for p in plans if p.shared]
    assert len(model.shared_bases) == len(shared_groups)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shared_basis_is_one_module_used_by_every_member():
    model, family, stats = setup("llama")
    method(group_size=2).compress(model, family, _ctx(stats))
    layers = family.layers(model)
    q0, q1, q2 = (family.module(layers[i], "q") for i in range(3))
    assert q0.basis is q1.basis is model.shared_bases["q_g0"]
    assert q2.basis is model.shared_bases["q_g1"] and q2.basis is not q0.basis
    assert q0.coefficient is not q1.coefficient
    assert isinstance(family.module(layers[0], "o"), LowRankLinear)  # o is private for LLaMA
    names = [n for n, _ in model.named_parameters() if "q_g0" in n]
    assert names == ["shared_bases.q_g0.weight"]  # registered (and counted) exactly once


def test_gqa_and_biases_keep_their_shapes():
    model, family, stats = setup("mistral")
    method().compress(model, family, _ctx(stats))
    k0 = family.module(family.layers(model)[0], "k")
    assert isinstance(k0, LowRankLinear) and k0.coefficient.out_features == 16  # private k/v
    opt, opt_family, opt_stats = setup("opt")
    originals = [opt_family.bias(layer, "up").clone() for layer in opt_family.layers(opt)]
    method().compress(opt, opt_family, _ctx(opt_stats))
    for layer, bias in zip(opt_family.layers(opt), originals, strict=True):
        assert torch.equal(opt_family.module(layer, "up").coefficient.bias, bias)


def test_group_size_one_is_per_layer_whitened_svd():
    """SVD-LLM (and Basis Sharing with n=1) equals the per-layer whitened SVD, every kind."""
    model, family, stats = setup("llama")
    layers = family.layers(model)
    originals = {
        (i, k): family.weight(layers[i], k).detach().clone()
        for i in range(len(layers))
        for k in family.kinds
    }
    svd = make_tiny_model("llama", dtype=torch.float64)
    bs1 = make_tiny_model("llama", dtype=torch.float64)
    eps = 7e-6
    method("svd_llm", eps=eps).compress(svd, family, _ctx(stats, ratio=0.4))
    method(group_size=1, eps=eps).compress(bs1, family, _ctx(stats, ratio=0.4))
    for (i, kind), w in originals.items():
        d_in, d_out = w.shape
        k = d_in * d_out * 6 // 10 // (d_in + d_out)
        oracle_b, (oracle_c,) = decompose_shared(
            [w], whitening_factor(stats.gram(i, family.projection(kind).input), 7e-6).S
        ).truncate(k)
        for compressed in (svd, bs1):
            module = family.module(family.layers(compressed)[i], kind)
            assert isinstance(module, LowRankLinear) and module.rank == k
            product = module.basis.weight.T @ module.coefficient.weight.T
            torch.testing.assert_close(product, oracle_b @ oracle_c, rtol=0, atol=1e-10)


def test_dead_neurons_whiten_without_nan():
    model, family, stats = setup("llama")
    for i in range(len(family.layers(model))):  # feature 3 of the MLP hidden is never active
        gram = stats.grams[(i, "mlp_hidden")]
        gram[3, :] = 0.0
        gram[:, 3] = 0.0
    info = method().compress(model, family, _ctx(stats))
    assert info["whitening_fallbacks"] >= 1
    assert {g["kind"] for g in info["whitening_fallback_groups"]} == {"down"}
    assert torch.isfinite(logits(model, torch.randint(0, 320, (1, 10)))).all()


def test_sweep_reuses_the_decompositions():
    caches = SweepCaches()  # this test owns them, as run.py's process does for a -m sweep
    decompositions = caches.decompositions
    model, family, stats = setup("llama")
    method().compress(model, family, _ctx(stats, key="k1", caches=caches))
    first = decompositions.misses
    # The tiny LLaMA's k/v are 64 -> 32 (GQA): private by default, so q/up/gate share in pairs.
    assert first == 3 * 2 + 4 * 4 and decompositions.hits == 0  # 22 groups, all computed
    assert len(decompositions) == first
    again = make_tiny_model("llama", dtype=torch.float64)
    ref = make_tiny_model("llama", dtype=torch.float64)
    method().compress(again, family, _ctx(stats, ratio=0.4, key="k1", caches=caches))
    assert decompositions.misses == first  # nothing recomputed for the new ratio
    assert decompositions.hits == first
    method().compress(ref, family, _ctx(stats, ratio=0.4, caches=caches))  # no key: computed afresh
    assert (decompositions.misses, decompositions.hits) == (first, first)
    probe = torch.randint(0, 320, (1, 12))
    torch.testing.assert_close(logits(again, probe), logits(ref, probe), rtol=0, atol=1e-12)
    # Another owner starts empty: nothing is shared through the module.
    other = SweepCaches()
    method().compress(
        make_tiny_model("llama", dtype=torch.float64),
        family,
        _ctx(stats, ratio=0.4, key="k1", caches=other),
    )
    assert (other.decompositions.misses, other.decompositions.hits) == (first, 0)
    assert (decompositions.misses, decompositions.hits) == (first, first)


def test_kinds_and_groups_follow_the_config():
    fam = get_family("llama")
    assert resolve_kinds(fam, None, None) == (("q", "k", "v", "up", "gate"), ("o", "down"))
    assert resolve_kinds(fam, ["q"], None) == (("q",), ("k", "v", "o", "up", "gate", "down"))
    with pytest.raises(ConfigError, match="in both: \\['q'\\]"):
        resolve_kinds(fam, ["q", "k"], ["q", "v", "o", "up", "gate", "down"])
    with pytest.raises(ConfigError, match="Valid choices"):
        resolve_kinds(fam, ["attn"], None)
    assert layer_groups(5, 2) == [(0, 1), (2, 3), (4,)]
    assert layer_groups(4, 1) == [(0,), (1,), (2,), (3,)]


def test_remainder_group_keeps_the_nominal_rank_unless_asked():
    model, family, _ = setup("llama")
    nominal = method(group_size=3).plan(model, family, _ctx(None, 0.3))
    own = method(group_size=3, remainder_rank="own").plan(model, family, _ctx(None, 0.3))
    last_q = [p for p in nominal if p.kind == "q"][-1]
    assert last_q.layers == (3,) and last_q.rank == 64 * 64 * 3 * 7 // 10 // (64 + 3 * 64)
    assert [p for p in own if p.kind == "q"][-1].rank == 64 * 64 * 7 // 10 // (64 + 64)


def _ctx(stats, ratio: float = 0.3, key: str | None = None, caches: SweepCaches | None = None):
    from basis_sharing.methods.registry import CompressionContext

    ctx = CompressionContext(ratio=ratio, device=CPU, stats={"gram": stats}, caches=caches)
    if key is not None:
        ctx.stats_key = key
    return ctx
