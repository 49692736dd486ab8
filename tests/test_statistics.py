"""The statistics registry: one hooked pass fills several statistics, each cached on its own.

Oracles: each statistic collected alone (``collect_grams``, ``collect_scales``,
``collect_fisher``: checked against independent captures in test_calibration_*.py), counted
forward passes, and the cache files on disk.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model

from basis_sharing.calibration import (
    STATISTICS,
    collect_fisher,
    collect_grams,
    collect_scales,
    collect_statistics,
    fisher_key,
    get_statistic,
    scales_key,
    stats_key,
    stats_path,
)
from basis_sharing.calibration.collect import collect_statistic
from basis_sharing.errors import ConfigError
from basis_sharing.models.families import get_family

IDENT = {"model": "tiny", "dtype": "float64"}
CALIB = "d" * 64


def _ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _collect(model, family, names, cache_dir, batch_size=4, gram_dtype="float64"):
    return collect_statistics(
        names, model, family, _ids(), batch_size, gram_dtype, IDENT, CALIB, cache_dir
    )


def test_the_registry_names_every_statistic_and_what_it_needs():
    names = ("gram", "scale", "fisher", "mlp_inputs")
    assert set(STATISTICS) == set(names)
    assert [STATISTICS[n].backward for n in names] == [False, False, True, False]
    assert [STATISTICS[n].stat for n in names] == ["grams", "scales", "fisher", "mlp_inputs"]
    with pytest.raises(ConfigError, match="Unknown calibration statistic 'gramm'.*'gram'"):
        get_statistic("gramm")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_grams_and_scales_share_one_forward_pass_and_equal_their_solo_values(name, tmp_path):
    model, family = make_tiny_model(name, dtype=torch.float64), get_family(name)
    grams = collect_grams(model, family, _ids(), 4, "float64")
    scales = collect_scales(model, family, _ids(), 4)
    calls = _count_forwards(model)
    both = _collect(model, family, ["gram", "scale"], tmp_path)
    assert calls[0] == 2  # one pass: two batches of 4 and 2 samples
    assert not both["gram"].cache_hit and not both["scale"].cache_hit
    assert set(both["gram"].value.grams) == set(grams.grams)
    for key, gram in grams.grams.items():
        assert torch.equal(both["gram"].value.grams[key], gram)
    for key, mean in scales.abs_mean.items():
        assert torch.equal(both["scale"].value.abs_mean[key], mean)
        assert torch.equal(both["scale"].value.abs_max[key], scales.abs_max[key])
    assert both["scale"].value.batches == scales.batches == 2


def test_keys_are_the_ones_earlier_caches_were_written_under(tmp_path):
    model, family = make_tiny_model("llama"), get_family("llama")
    got = _collect(model, family, ["scale", "gram"], tmp_path, gram_dtype="float32")
    assert list(got) == ["scale", "gram"]  # in the order asked
    assert got["gram"].key == stats_key(IDENT, CALIB, "float32")
    assert got["scale"].key == scales_key(IDENT, CALIB, 4)
    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert files == sorted(f"{c.key}.safetensors" for c in got.values())


def test_a_second_call_reads_everything_from_the_cache_without_a_pass(tmp_path):
    model, family = make_tiny_model("opt", dtype=torch.float64), get_family("opt")
    first = _collect(model, family, ["gram", "scale", "fisher"], tmp_path)
    calls = _count_forwards(model)
    again = _collect(model, family, ["gram", "scale", "fisher"], tmp_path)
    assert calls[0] == 0 and all(c.cache_hit for c in again.values())
    for key, gram in first["gram"].value.grams.items():
        assert torch.equal(again["gram"].value.grams[key], gram)
    for key, row in first["fisher"].value.rows.items():
        assert torch.equal(again["fisher"].value.rows[key], row)


def test_only_the_missing_statistic_is_computed_and_a_damaged_one_is_recomputed(tmp_path, caplog):
    model, family = make_tiny_model("llama", dtype=torch.float64), get_family("llama")
    first = _collect(model, family, ["gram"], tmp_path)
    path = stats_path(tmp_path, first["gram"].key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 32] = b"\x00" * 32  # finite garbage: the checksum
    path.write_bytes(bytes(data))
    calls = _count_forwards(model)
    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        got = _collect(model, family, ["gram", "scale"], tmp_path)
    assert calls[0] == 2  # one pass recomputes both: the damaged Grams and the missing scales
    assert not got["gram"].cache_hit and not got["scale"].cache_hit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "sha256" in warnings[0]
    for key, gram in first["gram"].value.grams.items():
        assert torch.equal(got["gram"].value.grams[key], gram)
    calls[0] = 0
    scale_only = _collect(model, family, ["scale", "gram"], tmp_path)
    assert calls[0] == 0 and all(c.cache_hit for c in scale_only.values())


def test_fisher_runs_its_own_backward_pass_and_equals_its_solo_value(tmp_path):
    model, family = make_tiny_model("mistral", dtype=torch.float64), get_family("mistral")
    solo = collect_fisher(model, family, _ids(), 4)
    got = _collect(model, family, ["fisher"], tmp_path)["fisher"]
    assert got.key == fisher_key(IDENT, CALIB, 4)
    assert set(got.value.rows) == set(solo.rows)
    for key, row in solo.rows.items():
        assert torch.equal(got.value.rows[key], row)


def test_the_single_statistic_form_returns_key_value_and_hit(tmp_path):
    model, family = make_tiny_model("gpt2"), get_family("gpt2")
    key, value, hit = collect_statistic(
        "gram", model, family, _ids(), 4, "float32", IDENT, CALIB, tmp_path, {"m": 1}
    )
    assert (key, hit) == (stats_key(IDENT, CALIB, "float32"), False)
    again = collect_statistic(
        "gram", model, family, _ids(), 4, "float32", IDENT, CALIB, tmp_path, {"m": 1}
    )
    assert again[0] == key and again[2] is True
    assert all(torch.equal(again[1].grams[k], g) for k, g in value.grams.items())
