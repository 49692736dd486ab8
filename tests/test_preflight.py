"""Everything the config and the model's shapes decide is refused before the weights load."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import compose_config

from basis_sharing import pipeline
from basis_sharing.errors import ConfigError, UserError


def compose_run(model_dir, mirror, tmp_path, *overrides: str):
    return compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        f"paths.cache_dir={tmp_path}/cache",
        "calibration=wikitext2",
        "calibration.split=validation",
        "calibration.n_samples=2",
        "calibration.seq_len=32",
        "eval=ppl",
        "eval.max_windows=1",
        "eval.ppl_datasets=[wikitext2]",
        "offline=true",
        *overrides,
    )


def run_refused(cfg, tmp_path, error, message: str) -> dict | None:
    with pytest.raises(error, match=re.escape(message)):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results.json"
    record = json.loads(results.read_text()) if results.exists() else None
    assert record is None or "load_model" not in record["stages"]
    return record


CONFIG_ONLY = [
    ("method.group_size=0", "method.group_size=0 must be >= 1"),
    (
        "method.remainder_rank=half",
        "Unknown method.remainder_rank 'half'. Valid choices: nominal, own.",
    ),
    ("calibration.gram_dtype=float16", "calibration.gram_dtype='float16': use float32"),
    ("calibration.n_samples=0", "calibration.n_samples=0 must be >= 1"),
    ("calibration.seq_len=1", "calibration.seq_len=1 must be >= 2"),
    ("calibration.seq_len=128", "calibration.seq_len=128 is longer than model.context_length=64"),
    ("ratio_tolerance=-0.1", "ratio_tolerance=-0.1 must be >= 0"),
    ("method.decomposition_cache_mb=-1", "method.decomposition_cache_mb=-1.0 must be >= 0"),
    ("method.eps=-1e-3", "method.eps=-0.001 must be a finite number > 0"),
    ("+method.shared=[q,qq]", "Unknown projection kind for family llama 'qq'"),
]


@pytest.mark.parametrize(("override", "message"), CONFIG_ONLY)
def test_config_only_settings_fail_before_any_data_is_read(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load, override, message
):
    cfg = compose_run(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=basis_sharing",
        "model.family=llama",
        override,
    )
    assert run_refused(cfg, tmp_path, ConfigError, message) is None  # not even a record started


ASVD_SETTINGS = [
    ("method.scale=abs_sum", "Unknown method.scale 'abs_sum'. Valid choices: abs_max, abs_mean."),
    ("method.allocation=greedy", "Unknown method.allocation 'greedy'. Valid choices: sensitivity,"),
    ("method.candidate_ratios=[0.5,1.5]", "method.candidate_ratios=[0.5, 1.5]"),
    ("method.sensitivity_samples=0", "method.sensitivity_samples=0 must be >= 1"),
]


@pytest.mark.parametrize(("override", "message"), ASVD_SETTINGS)
def test_asvd_settings_fail_before_any_data_is_read(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load, override, message
):
    cfg = compose_run(tiny_model_dir, tiny_mirror, tmp_path, "method=asvd", override)
    assert run_refused(cfg, tmp_path, ConfigError, message) is None


SHAPE_CHECKS = [
    # The tiny llama: 4 layers, 256 positions, hidden 64, GQA k/v 64 -> 32.
    (("method.group_size=5",), ConfigError, "method.group_size=5 exceeds the model's 4 decoder"),
    (("model.context_length=512",), ConfigError, "model.context_length=512 exceeds what model"),
    (("ratio=0.999",), ConfigError, "ratio=0.999 leaves no basis vector"),
    (("+method.private=[o,dn]",), ConfigError, "Unknown projection kind for family llama 'dn'"),
    (
        ("+method.shared=[q,k]", "+method.private=[k,v,o,up,gate,down]"),
        ConfigError,
        "in both: ['k']",
    ),
    (
        ("ratio_tolerance=0.00001",),
        UserError,
        "The rank plan (from the model's shapes, before any weight is loaded) compresses",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "message"), SHAPE_CHECKS)
def test_shape_checks_fail_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load, overrides, error, message
):
    """model=local has no family in its config: the kinds are checked once config.json is read."""
    cfg = compose_run(tiny_model_dir, tiny_mirror, tmp_path, "method=basis_sharing", *overrides)
    record = run_refused(cfg, tmp_path, error, message)
    assert record is not None and record["status"] == "failed"
    assert "calibrate" not in record["stages"] and "tokenize" not in record["stages"]


def test_the_predicted_ratio_is_recorded_and_equals_the_achieved_one(
    tiny_model_dir, tiny_mirror, tmp_path
):
    cfg = compose_run(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=basis_sharing",
        "ratio=0.3",
        "ratio_tolerance=0.05",
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert record["preflight"]["layers"] == 4 and record["preflight"]["max_positions"] == 256
    assert record["preflight"]["predicted_ratio"] == record["params"]["achieved_ratio"]


def test_a_missing_local_model_is_reported_before_the_data(tmp_path, tiny_mirror, no_model_load):
    """Not the missing WikiText-2 train split it used to report first."""
    cfg = compose_run(tmp_path / "nowhere", tmp_path / "no_mirror", tmp_path, "method=dense")
    message = f"model.local_path={tmp_path / 'nowhere'} does not exist or is not a directory"
    assert run_refused(cfg, tmp_path, ConfigError, message) is None


def test_a_local_model_without_weights_is_refused(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load
):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, bare / name)
    cfg = compose_run(bare, tiny_mirror, tmp_path, "method=dense")
    message = f"model.local_path={bare} has a config.json but no weights"
    assert run_refused(cfg, tmp_path, ConfigError, message) is None
