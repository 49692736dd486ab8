"""The deviated-input updates: least-squares refits that never increase their own objective."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import collect_grams
from basis_sharing.linalg.factorization import concat_weights, decompose_shared
from basis_sharing.linalg.refit import output_error, refit_coefficients
from basis_sharing.linalg.whitening import whiten
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.methods.update import refit_sequential
from basis_sharing.models.families import family_for_model_type

F64 = torch.float64
CPU = torch.device("cpu")


def test_refit_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g, dtype=F64)
    basis = torch.randn(10, 4, generator=g, dtype=F64)
    w = torch.randn(10, 14, generator=g, dtype=F64)
    c = refit_coefficients(basis, x.T @ x, w)
    oracle = torch.linalg.lstsq(x @ basis, x @ w).solution
    torch.testing.assert_close(c, oracle, rtol=0, atol=1e-10)
    assert output_error(x.T @ x, w, basis @ c) == pytest.approx(
        float(torch.linalg.matrix_norm(x @ w - x @ basis @ c)), rel=1e-9
    )


def test_refit_survives_a_basis_the_inputs_never_excite():
    x = torch.randn(100, 6, dtype=F64)
    x[:, 5] = 0.0
    basis = torch.zeros(6, 2, dtype=F64)
    basis[5, 0] = 1.0  # lives only on the dead feature
    basis[0, 1] = 1.0
    c = refit_coefficients(basis, x.T @ x, torch.randn(6, 3, dtype=F64))
    assert torch.isfinite(c).all()


def setup(method_cls, schema, family_name="llama", *, model_dtype=F64, **kw):
    model = make_tiny_model(family_name, dtype=model_dtype)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_grams(model, family, ids, 4, F64)
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": method_cls.name, **kw})
    ctx = CompressionContext(
        ratio=0.5, device=CPU, calibration_ids=ids, calib_batch_size=4, stats={"gram": stats}
    )
    ctx.gram_dtype = F64
    return model, family, method_cls(cfg), ctx


def dense_weights(model, family):
    """(layer, kind) -> a copy of the dense W (d_in, d_out), before compression."""
    return {
        (i, k): family.weight(layer, k).detach().clone()
        for i, layer in enumerate(family.layers(model))
        for k in family.kinds
    }


def coefficients(model, family):
    return {
        (i, k): family.module(layer, k).coefficient.weight.detach().clone()
        for i, layer in enumerate(family.layers(model))
        for k in family.kinds
    }


@pytest.mark.parametrize("family_name", ["llama", "opt", "gpt2", "qwen2", "gemma2"])
def test_basis_sharing_update_solves_the_deviated_least_squares(family_name):
    plain, family, method, ctx = setup(BasisSharing, BasisSharingMethodConfig, family_name)
    originals = dense_weights(plain, family)
    method.compress(plain, family, ctx)
    deviated = collect_grams(plain, family, ctx.calibration_ids, 4, F64)  # inputs X^ of plain

    updated, _, method_u, ctx_u = setup(
        BasisSharing, BasisSharingMethodConfig, family_name, update=True
    )
    info = method_u.compress(updated, family, ctx_u)["update"]
    assert info["mode"] == "one_pass" and info["error_after"] <= info["error_before"]
    layers = family.layers(updated)
    for group in info["groups"]:
        assert group["error_after"] <= group["error_before"] * (1 + 1e-9) + 1e-12
        members, kind = group["layers"], group["kind"]
        basis = family.module(layers[members[0]], kind).basis.weight.detach().T
        gram = deviated.group_gram(members, family.projection(kind).input)
        oracle = refit_coefficients(
            basis, gram, concat_weights([originals[(i, kind)] for i in members])
        )
        got = torch.cat(
            [family.module(layers[i], kind).coefficient.weight.detach().T for i in members], dim=1
        )
        torch.testing.assert_close(got, oracle, rtol=0, atol=1e-8)


def test_svd_llm_update_is_sequential():
    plain, family, method, ctx = setup(SVDLLM, WhitenedSVDMethodConfig, eps=7e-6)
    method.compress(plain, family, ctx)
    before = coefficients(plain, family)
    updated, _, method_u, ctx_u = setup(SVDLLM, WhitenedSVDMethodConfig, eps=7e-6, update=True)
    info = method_u.compress(updated, family, ctx_u)["update"]
    after = coefficients(updated, family)
    assert info["mode"] == "layerwise"
    assert len(info["groups"]) == 4 * len(family.kinds)
    for group in info["groups"]:
        assert group["error_after"] <= group["error_before"] * (1 + 1e-9) + 1e-12
    # Layer 0's q/k/v see the original inputs, where the whitened truncation already is the
    # least-squares optimum: the refit leaves them unchanged. Later layers move.
    for kind in ("q", "k", "v"):
        torch.testing.assert_close(after[(0, kind)], before[(0, kind)], rtol=0, atol=1e-8)
    assert not torch.allclose(after[(3, "down")], before[(3, "down")], atol=1e-6)
    assert info["error_after"] < info["error_before"]


@pytest.mark.parametrize("family_name", ["llama", "opt", "gemma2"])
def test_layerwise_update_on_shared_groups_refits_each_member_on_its_own_final_inputs(family_name):
    """update=layerwise with shared bases: member (i, kind) is refit when layer i is reached, on
    the inputs it sees once every earlier member is final. Those are its inputs in the finished
    model, so the oracle is each member's deviated least squares on the final model's Grams."""
    model, family, method, ctx = setup(
        BasisSharing, BasisSharingMethodConfig, family_name, update="layerwise"
    )
    originals = dense_weights(model, family)
    info = method.compress(model, family, ctx)["update"]
    assert info["mode"] == "layerwise"
    final = collect_grams(model, family, ctx.calibration_ids, 4, F64)
    layers = family.layers(model)
    shared_members = 0
    for report in info["groups"]:
        (i,) = report["layers"]
        kind = report["kind"]
        assert report["error_after"] <= report["error_before"] * (1 + 1e-9) + 1e-12
        module = family.module(layers[i], kind)
        basis = module.basis.weight.detach().T
        gram = final.group_gram((i,), family.projection(kind).input)
        oracle = refit_coefficients(basis, gram, originals[(i, kind)])
        torch.testing.assert_close(module.coefficient.weight.detach().T, oracle, rtol=0, atol=1e-8)
        if "group" in report:
            shared_members += 1
            assert i in report["group"] and len(report["group"]) > 1
    assert shared_members > 0  # the family's default shares some kinds in groups of 2
    # every member of every group refit exactly once, in depth order
    members = [(r["layers"][0], r["kind"]) for r in info["groups"]]
    assert sorted(set(members)) == sorted(members)
    assert [i for i, _ in members] == sorted(i for i, _ in members)
    # the shared bases did not move: members of one group still hold one basis tensor
    for report in info["groups"]:
        if "group" in report:
            first, *rest = report["group"]
            b0 = family.module(layers[first], report["kind"]).basis.weight
            for j in rest:
                assert family.module(layers[j], report["kind"]).basis.weight is b0


def test_layerwise_refit_samples_uses_the_first_samples_only():
    """refit_samples=N: the update equals the update of a run whose calibration is those N."""
    model, family, method, ctx = setup(
        BasisSharing, BasisSharingMethodConfig, update="layerwise", refit_samples=4
    )
    info = method.compress(model, family, ctx)["update"]
    assert info["tokens"] == 4 * ctx.calibration_ids.shape[1]
    # The oracle: the final model's Grams on the first 4 samples only.
    originals_model = make_tiny_model("llama", dtype=F64)
    originals = dense_weights(originals_model, family)
    final = collect_grams(model, family, ctx.calibration_ids[:4], 4, F64)
    layers = family.layers(model)
    for report in info["groups"]:
        (i,) = report["layers"]
        module = family.module(layers[i], report["kind"])
        gram = final.group_gram((i,), family.projection(report["kind"]).input)
        oracle = refit_coefficients(
            module.basis.weight.detach().T, gram, originals[(i, report["kind"])]
        )
        torch.testing.assert_close(module.coefficient.weight.detach().T, oracle, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("family_name", "whitening"), [("llama", "cholesky"), ("opt", "cholesky"), ("llama", "eigh")]
)
def test_layerwise_refit_basis_rederives_each_basis_at_its_first_member(family_name, whitening):
    """update=layerwise refit_basis=true: when a group's first member i is reached, its basis is
    the whitened truncation of [W_i | ... | W_n] on M^_i (i's Gram in the finished model: nothing
    after i changes it) plus the later members' ORIGINAL Grams; then every member's coefficients
    are refit on its own final inputs as without the option. A private layer gets the whitened
    truncation of its own deviated Gram: the best rank-k fit on those inputs."""
    model, family, method, ctx = setup(
        BasisSharing,
        BasisSharingMethodConfig,
        family_name,
        update="layerwise",
        refit_basis=True,
        whitening=whitening,
    )
    original = ctx.stats["gram"]
    originals = dense_weights(model, family)
    record = method.compress(model, family, ctx)
    info = record["update"]
    final = collect_grams(model, family, ctx.calibration_ids, 4, F64)
    layers = family.layers(model)
    plans = {(p["kind"], tuple(p["layers"])): p for p in record["groups"]}
    rederived = {"shared": 0, "private": 0}
    for report in info["groups"]:
        (i,) = report["layers"]
        kind = report["kind"]
        members = tuple(report.get("group", report["layers"]))
        module = family.module(layers[i], kind)
        basis = module.basis.weight.detach().T
        name = family.projection(kind).input
        gram = final.group_gram((i,), name)
        oracle_c = refit_coefficients(basis, gram, originals[(i, kind)])
        torch.testing.assert_close(
            module.coefficient.weight.detach().T, oracle_c, rtol=0, atol=1e-8
        )
        assert report.get("basis_refit", False) == (i == members[0])
        if i != members[0]:
            continue
        joint = gram + sum((original.group_gram((j,), name) for j in members[1:]), 0)
        white = whiten(joint, whitening, eps=method.cfg.eps)
        dec = decompose_shared([originals[(j, kind)] for j in members], white.S, 0.0, whitening)
        oracle_b, _ = dec.truncate(plans[(kind, members)]["rank"])
        signs = torch.sign((basis * oracle_b).sum(dim=0))  # an SVD's columns have free signs
        torch.testing.assert_close(basis, oracle_b * signs, rtol=1e-6, atol=1e-8)
        if len(members) == 1:
            rederived["private"] += 1
            # the rank-k optimum on M^_i: never worse than the basis it replaced
            assert report["error_after"] <= report["error_before"] * (1 + 1e-9) + 1e-12
        else:
            rederived["shared"] += 1
    assert rederived["shared"] > 0 and rederived["private"] > 0


def test_layerwise_refit_basis_with_refit_samples_weighs_every_member_alike():
    """refit_samples=4 of 8 with refit_basis: the first member's deviated Gram covers half the
    tokens of the later members' original Grams, so it is doubled in the group's sum before the
    whitened truncation (unscaled, the first member would count half as much as the others)."""
    model, family, method, ctx = setup(
        BasisSharing,
        BasisSharingMethodConfig,
        update="layerwise",
        refit_basis=True,
        refit_samples=4,
    )
    original = ctx.stats["gram"]
    originals = dense_weights(model, family)
    record = method.compress(model, family, ctx)
    final = collect_grams(model, family, ctx.calibration_ids[:4], 4, F64)
    assert original.tokens == 2 * final.tokens
    layers = family.layers(model)
    ranks = {(p["kind"], tuple(p["layers"])): p["rank"] for p in record["groups"]}
    shared = 0
    for report in record["update"]["groups"]:
        members = tuple(report.get("group", report["layers"]))
        (i,) = report["layers"]
        if len(members) == 1 or i != members[0]:
            continue
        kind, name = report["kind"], family.projection(report["kind"]).input
        joint = 2.0 * final.group_gram((i,), name) + original.group_gram(members[1:], name)
        white = whiten(joint, "cholesky", eps=method.cfg.eps)
        dec = decompose_shared([originals[(j, kind)] for j in members], white.S, 0.0)
        oracle, _ = dec.truncate(ranks[(kind, members)])
        basis = family.module(layers[i], kind).basis.weight.detach().T
        signs = torch.sign((basis * oracle).sum(dim=0))
        torch.testing.assert_close(basis, oracle * signs, rtol=1e-6, atol=1e-8)
        shared += 1
    assert shared > 0


@pytest.mark.parametrize(
    ("method_cls", "schema", "family_name"),
    [(BasisSharing, BasisSharingMethodConfig, f) for f in ("llama", "opt", "gpt2", "qwen2")]
    + [(SVDLLM, WhitenedSVDMethodConfig, "llama")],
)
def test_refit_basis_first_pass_installs_shapes_only(method_cls, schema, family_name, monkeypatch):
    """update=layerwise refit_basis=true re-derives every factor before it is used, so the first
    pass only installs zeros of the planned ranks: the compressed model is the same, bit for bit,
    as after a first pass that decomposed every group, and so is every error after the refit."""
    kw = {"update": "layerwise", "refit_basis": True}
    model, family, method, ctx = setup(method_cls, schema, family_name, **kw)
    assert method.update_derives_every_factor()
    record = method.compress(model, family, ctx)
    monkeypatch.setattr(method_cls, "update_derives_every_factor", lambda self: False)
    decomposed, _, method, ctx = setup(method_cls, schema, family_name, **kw)
    reference = method.compress(decomposed, family, ctx)
    assert (record["first_pass_decomposed"], reference["first_pass_decomposed"]) == (False, True)
    a, b = model.state_dict(), decomposed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def after(rec):
        return [(g["kind"], g["layers"], g["error_after"]) for g in rec["update"]["groups"]]

    assert after(record) == after(reference)
    assert record["planned_params"] == reference["planned_params"]


def test_first_pass_decomposes_unless_the_update_rederives_every_basis():
    """Without refit_basis (or with another update) the layerwise refit keeps the first pass's
    bases, so they are decomposed as before."""
    for kw in ({"update": "layerwise"}, {"update": "one_pass", "refit_basis": True}):
        model, family, method, ctx = setup(BasisSharing, BasisSharingMethodConfig, **kw)
        assert not method.update_derives_every_factor()
        assert method.compress(model, family, ctx)["first_pass_decomposed"]


def _layerwise(family_name, replay, monkeypatch, prepare=None):
    """A layerwise refit with re-derived bases, the attention replay on or off."""
    from basis_sharing.methods import basis_sharing as module

    model, family, method, ctx = setup(
        BasisSharing, BasisSharingMethodConfig, family_name, update="layerwise", refit_basis=True
    )
    if prepare is not None:
        prepare(model, family)
    monkeypatch.setattr(
        module, "refit_sequential", functools.partial(refit_sequential, replay_attention=replay)
    )
    info = method.compress(model, family, ctx)["update"]
    return model, info


@pytest.mark.parametrize("family_name", ["llama", "opt", "gpt2", "qwen2", "gemma2"])
def test_attention_replay_changes_no_number(family_name, monkeypatch):
    """Replaying the attention as o(x_o) after o's input pass only skips recomputation: every
    factor and every reported error is the same, bit for bit, as with each call run in full."""
    full, info_full = _layerwise(family_name, False, monkeypatch)
    replayed, info = _layerwise(family_name, True, monkeypatch)
    assert info_full.pop("replayed_layers") == 0
    assert info.pop("replayed_layers") == len(
        family_for_model_type(full.config.model_type).layers(full)
    )
    assert info == info_full
    a, b = full.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_attention_replay_falls_back_when_the_attention_does_more_than_o(monkeypatch):
    """An attention whose output is not o's (here a forward hook rescales it) fails the exactness
    check while its o input is recorded; the layer then runs in full, as without the replay.
    With refit_basis the first pass installs placeholders (``placeholder_factors``): the check
    runs on one of them, which must not be zero (against a zero o any attention would pass)."""

    def rescale(model, family):
        for layer in family.layers(model):
            layer.self_attn.register_forward_hook(lambda _m, _a, out: (out[0] * 1.5, *out[1:]))

    full, info_full = _layerwise("llama", False, monkeypatch, rescale)
    replayed, info = _layerwise("llama", True, monkeypatch, rescale)
    assert info.pop("replayed_layers") == 0
    info_full.pop("replayed_layers")
    assert info == info_full
    for key, value in full.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key


BF16 = torch.bfloat16


def _bf16_grams(model, family, ids):
    """The Grams (float64) of ``model`` on ``ids`` with the forward under bf16 autocast, as the
    calibration stage takes them under ``calibration.forward_dtype=bfloat16``."""
    with torch.autocast("cpu", BF16):
        return collect_grams(model, family, ids, 4, F64)


def _max_relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("refit_basis", [False, True])
def test_layerwise_refit_runs_its_forward_under_the_calibration_forward_dtype(refit_basis):
    """calibration.forward_dtype=bfloat16 (ctx.forward_dtype) reaches the refit's own pass: each
    member's coefficients solve its least squares on the Grams of the finished model's bf16
    forward (the oracle, as the calibration stage takes them), not on the float32 forward's; the
    Grams and the solves stay in float64."""
    kw = {"update": "layerwise", "refit_basis": refit_basis, "model_dtype": torch.float32}
    model, family, method, ctx = setup(BasisSharing, BasisSharingMethodConfig, **kw)
    ctx.forward_dtype = "bfloat16"
    originals = dense_weights(model, family)
    info = method.compress(model, family, ctx)["update"]
    assert info["forward_dtype"] == "bfloat16"
    bf16 = _bf16_grams(model, family, ctx.calibration_ids)
    fp32 = collect_grams(model, family, ctx.calibration_ids, 4, F64)
    layers = family.layers(model)
    worst_fp32 = 0.0
    for report in info["groups"]:
        (i,) = report["layers"]
        kind, name = report["kind"], family.projection(report["kind"]).input
        module = family.module(layers[i], kind)
        basis = module.basis.weight.detach().T.to(F64)
        got = module.coefficient.weight.detach().T.to(F64)
        w = originals[(i, kind)].to(F64)
        oracle = refit_coefficients(basis, bf16.group_gram((i,), name), w)
        torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-6)
        wrong = refit_coefficients(basis, fp32.group_gram((i,), name), w)
        worst_fp32 = max(worst_fp32, _max_relative(got, wrong))
    assert worst_fp32 > 1e-3  # the float32 forward's Grams would have given other coefficients


def test_one_pass_update_runs_its_forward_under_the_calibration_forward_dtype():
    """update=one_pass with ctx.forward_dtype=bfloat16: every group is refit on the deviated
    Grams of the first-pass model's bf16 forward."""
    kw = {"model_dtype": torch.float32}
    plain, family, method, ctx = setup(BasisSharing, BasisSharingMethodConfig, **kw)
    originals = dense_weights(plain, family)
    method.compress(plain, family, ctx)
    deviated = _bf16_grams(plain, family, ctx.calibration_ids)
    updated, _, method_u, ctx_u = setup(
        BasisSharing, BasisSharingMethodConfig, update="one_pass", **kw
    )
    ctx_u.forward_dtype = "bfloat16"
    info = method_u.compress(updated, family, ctx_u)["update"]
    assert info["forward_dtype"] == "bfloat16"
    layers = family.layers(updated)
    for group in info["groups"]:
        members, kind = group["layers"], group["kind"]
        basis = family.module(layers[members[0]], kind).basis.weight.detach().T.to(F64)
        gram = deviated.group_gram(members, family.projection(kind).input)
        w = concat_weights([originals[(i, kind)] for i in members]).to(F64)
        got = torch.cat(
            [family.module(layers[i], kind).coefficient.weight.detach().T for i in members], dim=1
        )
        oracle = refit_coefficients(basis, gram, w)
        torch.testing.assert_close(got.to(F64), oracle, rtol=1e-5, atol=1e-6)


def test_sequential_update_forwards_under_the_forward_dtype_and_solves_in_float64(monkeypatch):
    """update=sequential with ctx.forward_dtype=bfloat16: the dense and compressed layers' runs
    produce bf16 activations (o's and down's inputs come out of bf16 matmuls), while the
    statistics they fold into stay float64 and the refit still lowers every member's error."""
    from basis_sharing.methods import compensate

    seen = []
    add = compensate.CompensationStats.add

    def spy(self, x_hat, x):
        seen.append((x_hat.dtype, x.dtype))
        add(self, x_hat, x)
        assert self.hat.gram.dtype == F64 and self.cross.dtype == F64

    monkeypatch.setattr(compensate.CompensationStats, "add", spy)
    model, family, method, ctx = setup(
        BasisSharing, BasisSharingMethodConfig, update="sequential", model_dtype=torch.float32
    )
    ctx.forward_dtype = "bfloat16"
    info = method.compress(model, family, ctx)["update"]
    assert info["forward_dtype"] == "bfloat16"
    assert (BF16, BF16) in seen and (torch.float32, torch.float32) in seen
    for group in info["groups"]:
        assert group["error_after"] <= group["error_before"] * (1 + 1e-9) + 1e-12
