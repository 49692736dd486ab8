"""Each default is written once: a config group's YAML never repeats its schema's default.

A value that equals the default it would get anyway is a second copy of that default, and the two
drift apart the day one of them changes. Options that build on a sibling (``eval/quick.yaml`` on
``eval/paper.yaml``) are compared with what that sibling gives them instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf

import basis_sharing.finetune  # noqa: F401  (registers the fine-tuners' schemas)
import basis_sharing.methods  # noqa: F401  (registers the methods' schemas)
from basis_sharing import config
from basis_sharing.errors import ConfigError

CONF = REPO / "conf"
GROUP_SCHEMAS = {
    "model": config.ModelConfig,
    "calibration": config.CalibrationConfig,
    "eval": config.EvalConfig,
}


def schema_of(group: str, values: dict[str, Any]) -> type:
    if group in GROUP_SCHEMAS:
        return GROUP_SCHEMAS[group]
    return config.OPTION_SCHEMAS[group][option_name(group, values)]


def option_name(group: str, values: dict[str, Any]) -> str:
    """The option's ``name``: its own, or that of the sibling it extends (a preset)."""
    if "name" in values:
        return values["name"]
    for entry in values.get("defaults", []):
        if isinstance(entry, str) and (CONF / group / f"{entry}.yaml").is_file():
            return option_name(group, yaml.safe_load((CONF / group / f"{entry}.yaml").read_text()))
    raise KeyError(f"no name in the {group} option {values}")


def defaults_of(schema: type) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def repeated(values: dict, inherited: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``values`` equal to what ``inherited`` already gives them."""
    found = []
    for key, value in values.items():
        if key in ("defaults", "name") or key not in inherited:
            continue
        if isinstance(value, dict) and isinstance(inherited[key], dict):
            found += repeated(value, inherited[key], f"{prefix}{key}.")
        elif value == inherited[key]:
            found.append(f"{prefix}{key}: {value!r}")
    return found


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        elif key != "defaults":
            out[key] = value
    return out


def inherited_values(group: str, path: Path) -> dict:
    """What the option would hold without its own lines: the schema, then a sibling it extends."""
    values = yaml.safe_load(path.read_text()) or {}
    base = defaults_of(schema_of(group, values))
    for entry in values.get("defaults", []):
        if isinstance(entry, str) and (CONF / group / f"{entry}.yaml").is_file():
            sibling = yaml.safe_load((CONF / group / f"{entry}.yaml").read_text()) or {}
            base = merged(base, sibling)
    return base


OPTIONS = [
    (group, path)
    for group in ("model", "calibration", "eval", "logger", "method", "finetune")
    for path in sorted((CONF / group).glob("*.yaml"))
]


@pytest.mark.parametrize(("group", "path"), OPTIONS, ids=[f"{g}/{p.stem}" for g, p in OPTIONS])
def test_no_option_repeats_a_default(group, path):
    values = yaml.safe_load(path.read_text()) or {}
    again = repeated(values, inherited_values(group, path))
    assert not again, f"{path.relative_to(REPO)} repeats defaults of its schema: {again}"


def test_the_check_catches_a_repeated_default():
    inherited = defaults_of(config.EvalConfig)
    values = {"max_windows": None, "throughput": {"enabled": True, "seq_len": 32}}
    assert repeated(values, inherited) == ["max_windows: None", "throughput.seq_len: 32"]


def test_every_schema_field_has_its_default_in_the_composed_config():
    cfg = compose_config("model=llama7b", "calibration=c4", "eval=paper")
    for group, schema in GROUP_SCHEMAS.items():
        for f in dataclasses.fields(schema):
            if f.name != "name":
                assert f.name in cfg[group], f"{group}.{f.name}"
    assert cfg.calibration.n_samples == 256 and cfg.calibration.seq_len == 2048
    assert cfg.model.context_length == 2048 and cfg.model.dtype == "float32"


@pytest.mark.parametrize(
    ("schema", "node", "message"),
    [
        (config.ModelConfig, {"context_length": 1}, "model.context_length=1 must be >= 2"),
        (config.ModelConfig, {"dtype": "float8"}, "Unknown model.dtype 'float8'"),
        (config.CalibrationConfig, {"n_samples": 0}, "calibration.n_samples=0 must be >= 1"),
        (config.CalibrationConfig, {"gram_dtype": "float16"}, "use float32 .* or float64"),
        (config.EvalConfig, {"max_windows": 0}, "eval.max_windows=0 must be >= 1 or null"),
        (config.EvalConfig, {"dataset_windows": {"ptb": 0}}, "eval.dataset_windows.ptb=0"),
        (
            config.EvalConfig,
            {"ppl_datasets": ["wikitext2"], "dataset_windows": {"ptb": 2}},
            "not in eval.ppl_datasets",
        ),
        (
            config.EvalConfig,
            {"throughput": {"fraction": 1.5}},
            r"eval.throughput.fraction=1.5 must be in \(0, 1\]",
        ),
        (
            config.EvalConfig,
            {"zeroshot": {"tasks": ["arc_esay"]}},
            "Did you mean 'arc_easy'",
        ),
    ],
)
def test_a_group_checks_its_own_ranges(schema, node, message):
    """The checks live with the schema: a node is refused without any run or pipeline."""
    node = OmegaConf.merge(OmegaConf.structured(schema), node)
    with pytest.raises(ConfigError, match=message):
        schema.check(node)
