"""Every registered method owns its facts: schema, label, statistics, runtime support, range checks.

Iterates over the registry, so a newly registered method is covered without edits here. No model
is loaded except the tiny in-code one the shape-plan test builds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_config, make_tiny_model
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import basis_sharing.methods  # noqa: F401  (registers every method)
from basis_sharing.config import OPTION_SCHEMAS
from basis_sharing.errors import ConfigError
from basis_sharing.methods.registry import (
    METHODS,
    CompressionContext,
    CompressionMethod,
    MethodConfig,
    register_method,
)
from basis_sharing.models.families import family_for_model_type, get_family

CONF_METHOD = Path(__file__).resolve().parents[1] / "conf" / "method"
# What the calibration stage can hand a method.
STATISTICS = {"gram", "scale", "fisher", "mlp_inputs"}


def build(name: str, **settings) -> CompressionMethod:
    """The registered method ``name`` with its schema's defaults overridden by ``settings``."""
    cls = METHODS[name]
    cfg = OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": name, **settings})
    return cls(cfg)


# ---- what every registered method declares ------------------------------------------------------


def test_every_method_has_a_yaml_and_every_other_yaml_is_a_preset_of_one():
    stems = {p.stem for p in CONF_METHOD.glob("*.yaml")}
    assert set(METHODS) <= stems
    for preset in sorted(stems - set(METHODS)):
        text = yaml.safe_load((CONF_METHOD / f"{preset}.yaml").read_text())
        # A preset extends one method's option and sets some of its settings (not its name).
        assert text["defaults"][0] in METHODS and text["defaults"][1:] == ["_self_"], preset
        assert "name" not in text, preset
        composed = compose_config(f"method={preset}").method
        assert OmegaConf.get_type(composed) is METHODS[text["defaults"][0]].schema
    assert {"dense", "none", "svd", "fwsvd", "asvd", "svd_llm", "basis_sharing", "fips"} <= set(
        METHODS
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_declares_its_facts(name):
    cls = METHODS[name]
    assert cls.name == name
    assert isinstance(cls.label, str) and cls.label.strip() == cls.label != ""
    assert type(cls.supports_sequential) is bool
    assert isinstance(cls.stats_needed, frozenset) and cls.stats_needed <= STATISTICS
    assert type(cls.compresses) is bool
    # The schema: a MethodConfig dataclass, the one registered for this option and in Hydra's store.
    assert dataclasses.is_dataclass(cls.schema) and issubclass(cls.schema, MethodConfig)
    assert OPTION_SCHEMAS["method"][name] is cls.schema
    stored = ConfigStore.instance().load(f"schema/method/{name}.yaml").node
    assert OmegaConf.get_type(stored) is cls.schema


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_yaml_names_the_schema_and_writes_no_default_again(name):
    text = yaml.safe_load((CONF_METHOD / f"{name}.yaml").read_text())
    assert text == {"defaults": [f"/schema/method/{name}@_here_", "_self_"], "name": name}
    composed = compose_config(f"method={name}").method
    assert OmegaConf.get_type(composed) is METHODS[name].schema
    defaults = OmegaConf.to_container(OmegaConf.structured(METHODS[name].schema))
    assert OmegaConf.to_container(composed, resolve=True) == {**defaults, "name": name}


def test_labels_statistics_and_runtime_support_of_the_shipped_methods():
    facts = {n: (c.label, set(c.stats_needed), c.supports_sequential) for n, c in METHODS.items()}
    assert {n: facts[n] for n in ("dense", "none", "svd", "fwsvd", "asvd", "svd_llm")} == {
        "dense": ("Original", set(), True),
        "none": ("Loaded", set(), True),
        "svd": ("SVD", set(), True),
        "fwsvd": ("FWSVD", {"fisher"}, False),  # a backward pass through the whole model
        "asvd": ("ASVD", {"scale"}, False),  # the whole-model sensitivity search
        "svd_llm": ("SVD-LLM", {"gram"}, True),
    }
    assert facts["basis_sharing"] == ("Basis Sharing", {"gram"}, True)


def test_table_labels_come_from_the_registry():
    from basis_sharing.tables.specs import METHOD_LABELS

    assert METHOD_LABELS == {name: cls.label for name, cls in METHODS.items()}


# ---- registering a method registers its schema --------------------------------------------------


@dataclasses.dataclass
class ProbeConfig(MethodConfig):
    knob: int = 3


def test_registering_a_method_registers_its_schema():
    try:

        @register_method("facts_probe", schema=ProbeConfig)
        class Probe(CompressionMethod):
            label = "Probe"

        assert METHODS["facts_probe"] is Probe and Probe.schema is ProbeConfig
        assert OPTION_SCHEMAS["method"]["facts_probe"] is ProbeConfig
        node = ConfigStore.instance().load("schema/method/facts_probe.yaml").node
        assert OmegaConf.get_type(node) is ProbeConfig and node.knob == 3
        with pytest.raises(ValueError, match="method 'facts_probe' registered twice"):
            register_method("facts_probe", schema=ProbeConfig)(Probe)
    finally:  # the registries are process-wide: leave them as they were
        METHODS.pop("facts_probe", None)
        OPTION_SCHEMAS["method"].pop("facts_probe", None)
        ConfigStore.instance().repo["schema"]["method"].pop("facts_probe.yaml", None)


def test_a_schema_must_be_a_method_config_dataclass():
    @dataclasses.dataclass
    class Loose:
        name: str = "x"

    for schema in (Loose, dict, MethodConfig()):
        with pytest.raises(TypeError, match="schema must be a MethodConfig dataclass"):
            register_method("facts_bad", schema=schema)
    assert "facts_bad" not in METHODS and "facts_bad" not in OPTION_SCHEMAS["method"]


# ---- the parameter plan -------------------------------------------------------------------------

SHAPE_ONLY = {"asvd": {"allocation": "uniform"}}  # asvd's default allocation needs data


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.compresses))
def test_a_shape_only_plan_is_the_plan_and_needs_no_weights(name):
    family = family_for_model_type("llama")
    model = make_tiny_model("llama")
    with torch.device("meta"):
        skeleton = make_tiny_model("llama")
    method = build(name, **SHAPE_ONLY.get(name, {}))
    planned = method.shape_plan(skeleton, family, 0.3)
    assert planned is not None and planned != []
    assert planned == method.plan(model, family, CompressionContext(0.3, torch.device("cpu")))
    if name == "asvd":
        assert build("asvd").shape_plan(skeleton, family, 0.3) is None  # sensitivity: needs data


# ---- range checks: each refusal, by its message, before any data or weights ---------------------

LLAMA = "llama"
REFUSALS = [
    (
        "svd",
        {"decomposition_cache_mb": -1},
        None,
        "method.decomposition_cache_mb=-1.0 must be >= 0",
    ),
    ("svd", {"decomposition_cache_mb": math.nan}, None, "method.decomposition_cache_mb=nan"),
    ("fwsvd", {"eps": 0.0}, None, "method.eps=0.0 must be a finite number > 0."),
    ("fwsvd", {"eps": -1e-5}, None, "method.eps=-1e-05 must be a finite number > 0."),
    ("fwsvd", {"eps": math.nan}, None, "method.eps=nan must be a finite number > 0."),
    ("fwsvd", {"eps": math.inf}, None, "method.eps=inf must be a finite number > 0."),
    ("fwsvd", {"decomposition_cache_mb": -2}, None, "method.decomposition_cache_mb=-2.0"),
    (
        "asvd",
        {"scale": "abs_men"},
        None,
        "Unknown method.scale 'abs_men'. Valid choices: abs_max, abs_mean. "
        "Did you mean 'abs_mean'?",
    ),
    (
        "asvd",
        {"allocation": "sensitivty"},
        None,
        "Unknown method.allocation 'sensitivty'. Valid choices: sensitivity, uniform. "
        "Did you mean 'sensitivity'?",
    ),
    ("asvd", {"alpha": -0.1}, None, "method.alpha=-0.1 must be in [0, 1]"),
    ("asvd", {"alpha": 1.5}, None, "method.alpha=1.5 must be in [0, 1]"),
    ("asvd", {"alpha": math.nan}, None, "method.alpha=nan must be in [0, 1]"),
    ("asvd", {"candidate_ratios": []}, None, "method.candidate_ratios=[]: give at least one"),
    ("asvd", {"candidate_ratios": [0.5, 1.0]}, None, "method.candidate_ratios=[0.5, 1.0]:"),
    ("asvd", {"candidate_ratios": [0.0, 0.5]}, None, "each in (0, 1)"),
    ("asvd", {"sensitivity_samples": 0}, None, "method.sensitivity_samples=0 must be >= 1."),
    ("asvd", {"decomposition_cache_mb": -1}, None, "method.decomposition_cache_mb=-1.0"),
    ("svd_llm", {"eps": 0.0}, None, "method.eps=0.0 must be a finite number > 0."),
    ("svd_llm", {"decomposition_cache_mb": -1}, None, "method.decomposition_cache_mb=-1.0"),
    ("basis_sharing", {"eps": -7e-6}, None, "method.eps=-7e-06 must be a finite number > 0."),
    ("basis_sharing", {"group_size": 0}, None, "method.group_size=0 must be >= 1."),
    (
        "basis_sharing",
        {"remainder_rank": "owm"},
        None,
        "Unknown method.remainder_rank 'owm'. Valid choices: nominal, own. Did you mean 'own'?",
    ),
    ("basis_sharing", {"shared": ["q", "qq"]}, LLAMA, "Unknown projection kind for family llama"),
    ("basis_sharing", {"private": ["o", "dn"]}, LLAMA, "'dn'"),
    ("basis_sharing", {"decomposition_cache_mb": -1}, None, "method.decomposition_cache_mb=-1.0"),
    ("basis_sharing", {"kinds": ["up", "upp"]}, LLAMA, "Did you mean 'up'?"),
    ("svd_llm", {"kinds": []}, None, "must name each projection kind to compress once"),
    ("fips", {"ratio_of": "mlp"}, None, "Unknown method.ratio_of 'mlp'. Valid choices"),
    ("fips", {"schedule": "releasd"}, None, "Did you mean 'released'?"),
    ("fips", {"group_size": 0}, None, "method.group_size=0 must be >= 1."),
    ("fips", {"lr": 0.0}, None, "method.lr=0.0 must be > 0"),
    ("fips", {"t_accel": 0.8, "t_end": 0.5}, None, "0 <= t_accel <= t_end <= 1"),
    ("fips", {"max_tokens": 0}, None, "method.max_tokens=0 must be >= 1 (or null)."),
    ("fips", {"kinds": ["down", "down"]}, LLAMA, "must name each MLP kind once"),
]


@pytest.mark.parametrize(("name", "settings", "family", "message"), REFUSALS)
def test_a_setting_out_of_range_is_refused_by_its_method(name, settings, family, message):
    method = build(name, **settings)
    with pytest.raises(ConfigError, match=re.escape(message)):
        method.check_config(get_family(family) if family else None)


def test_every_refusal_list_covers_every_method_with_settings():
    """A method with settings beyond ``name`` has refusals listed above (a new one too)."""
    with_settings = {
        n
        for n, c in METHODS.items()
        if set(f.name for f in dataclasses.fields(c.schema)) > {"name"}
    }
    assert with_settings == {name for name, *_ in REFUSALS}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_defaults_and_the_edges_of_each_range_are_accepted(name):
    edges = {
        "asvd": [{"alpha": 0.0}, {"alpha": 1.0}, {"candidate_ratios": [0.01, 0.99]}],
        "basis_sharing": [{"remainder_rank": "own", "group_size": 1, "shared": ["q"]}],
    }
    for settings in [{}, *edges.get(name, [])]:
        if "decomposition_cache_mb" in METHODS[name].schema.__dataclass_fields__:
            settings = {**settings, "decomposition_cache_mb": 0}  # 0 disables: allowed
        build(name, **settings).check_config(get_family(LLAMA))  # raises on a refusal
