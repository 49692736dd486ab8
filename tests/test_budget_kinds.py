"""``method.kinds``: compress some projection kinds only, the ratio a fraction of their weights.

The other kinds stay the very dense modules they were; the parameter report gains a ``budget``
section (the ratio over the named kinds, the one the target is checked against) and keeps the
ratio over every decoder projection; without ``method.kinds`` nothing changes (no section).
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, make_tiny_model, tiny_run_overrides
from omegaconf import OmegaConf

from basis_sharing.calibration.grams import collect_grams
from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.params import dense_projection_weights, parameter_report
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.plan import planned_params, resolve_kinds
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import family_for_model_type, get_family
from basis_sharing.modules import CompressedLinear

MLP = ["up", "gate", "down"]


def method(name: str, **kw):
    schema = BasisSharingMethodConfig if name == "basis_sharing" else WhitenedSVDMethodConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **kw})
    return BasisSharing(cfg) if name == "basis_sharing" else SVDLLM(cfg)


def compress(name: str, family_name: str = "llama", ratio: float = 0.3, **kw):
    model = make_tiny_model(family_name, dtype=torch.float64)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_grams(model, family, ids, batch_size=4, accumulate_dtype=torch.float64)
    dense_modules = {
        (i, k): family.module(layer, k)
        for i, layer in enumerate(family.layers(model))
        for k in family.kinds
    }
    dense_all = dense_projection_weights(model, family)
    m = method(name, **kw)
    kinds = m.budget_kinds(family)
    budget = (kinds, dense_projection_weights(model, family, kinds)) if kinds else None
    ctx = CompressionContext(ratio=ratio, device=torch.device("cpu"), stats={"gram": stats})
    plans = m.plan(model, family, ctx)
    info = m.apply(model, family, plans, ctx)
    return model, family, dense_modules, parameter_report(model, family, dense_all, budget), info


@pytest.mark.parametrize("name", ["basis_sharing", "svd_llm"])
@pytest.mark.parametrize("family_name", ["llama", "opt", "gpt2"])
def test_only_the_named_kinds_are_compressed_and_the_ratio_is_over_their_weights(name, family_name):
    family = get_family(family_name)
    mlp = [k for k in family.kinds if k in MLP]
    model, family, before, params, info = compress(name, family_name, kinds=mlp)
    for (i, kind), old in before.items():
        now = family.module(family.layers(model)[i], kind)
        assert isinstance(now, CompressedLinear) == (kind in mlp)
        if kind not in mlp:
            assert now is old  # untouched: the very module, its weights unchanged
    budget = params["budget"]
    assert budget["kinds"] == mlp
    assert budget["kept"] == info["planned_params"]["kept"] - (
        info["planned_params"]["dense"] - budget["dense"]
    )
    assert abs(budget["achieved_ratio"] - 0.3) < 0.05
    # The attention is dense, so over every projection the ratio is the MLP's share of it.
    dense_all = params["dense_decoder_projections"]
    kept_all = budget["kept"] + dense_all - budget["dense"]
    assert params["decoder_projections"] == kept_all
    assert params["achieved_ratio"] == pytest.approx(1 - kept_all / dense_all)
    assert params["achieved_ratio"] < budget["achieved_ratio"]


def test_without_method_kinds_the_report_has_no_budget_section():
    *_, params, info = compress("basis_sharing")
    assert "budget" not in params
    assert info["shared_kinds"] == ["q", "up", "gate"]  # the tiny llama is GQA


def test_the_kinds_split_follows_the_family_defaults_within_method_kinds():
    fam = get_family("llama")
    assert resolve_kinds(fam, None, None, (), MLP) == (("up", "gate"), ("down",))
    assert resolve_kinds(fam, None, None, ("k", "v"), ["q", "k", "v"]) == (("q",), ("k", "v"))
    assert resolve_kinds(fam, ["up"], None, (), MLP) == (("up",), ("gate", "down"))
    with pytest.raises(ConfigError, match=r"must split method.kinds.*not compressed: \['q'\]"):
        resolve_kinds(fam, ["q", "up"], None, (), MLP)


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        (["up", "up"], "must name each projection kind to compress once"),
        ([], "must name each projection kind to compress once"),
        (["mlp"], "Valid choices"),
    ],
)
def test_bad_method_kinds_are_refused(kinds, message):
    with pytest.raises(ConfigError, match=message):
        method("basis_sharing", kinds=kinds).check_config(get_family("llama"))


def test_the_planned_budget_ratio_is_the_counted_one():
    model = make_tiny_model("llama")
    family = family_for_model_type(model.config.model_type)
    m = method("basis_sharing", kinds=MLP)
    plans = m.shape_plan(model, family, 0.4)
    dense = dense_projection_weights(model, family, m.budget_kinds(family))
    planned = 1 - planned_params(plans, dense)["kept"] / dense
    *_, params, _ = compress("basis_sharing", ratio=0.4, kinds=MLP)
    assert planned == params["budget"]["achieved_ratio"]


def test_the_run_checks_the_target_against_the_budget_ratio(tiny_model_dir, tiny_mirror, tmp_path):
    from basis_sharing import pipeline

    common = [
        f"paths.cache_dir={tmp_path}/cache",
        "eval.ppl_datasets=[wikitext2]",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=4",
        "calibration.seq_len=32",
        "method=svd_llm",
        "ratio=0.3",
        "ratio_tolerance=0.03",
    ]
    cfg = compose_config(
        *tiny_run_overrides(tiny_model_dir, tiny_mirror, *common, "method.kinds=[up,gate,down]")
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    params = record["params"]
    assert abs(params["budget"]["achieved_ratio"] - 0.3) <= 0.03
    assert params["achieved_ratio"] < 0.27  # over every projection it would have been refused
    assert record["preflight"]["predicted_ratio"] == params["budget"]["achieved_ratio"]
