"""model.calib_batch_size=auto (calibration/batching.py) and calibration.gram_device=cpu.

The byte counts are checked against hand-written formulas on a tiny LLaMA, the choice against
its closed form, and a run with ``auto`` against the same run with the chosen size written out
(identical numbers). Offloaded Grams equal the device-resident ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, make_tiny_model

from basis_sharing import pipeline
from basis_sharing.calibration import batching
from basis_sharing.calibration.batching import (
    Footprint,
    choose_batch_size,
    fit_batch_size,
    gram_bytes,
    resident_bytes,
    sample_bytes,
)
from basis_sharing.calibration.grams import GRAM, GramAccumulator, collect_grams
from basis_sharing.calibration.statistics import collect_forward
from basis_sharing.config import check_batch_setting, is_auto_batch
from basis_sharing.errors import ConfigError
from basis_sharing.models.families import family_for_model_type

F64 = torch.float64


def footprint(free, resident, per_sample, fraction=1.0):
    return Footprint(free=free, resident=resident, per_sample=per_sample, fraction=fraction)


def test_the_batch_is_what_the_free_memory_holds_clamped_to_the_samples():
    assert fit_batch_size(footprint(1000, 100, 30, 0.5), limit=64) == (500 - 100) // 30  # 13
    assert fit_batch_size(footprint(1000, 100, 30, 0.5), limit=8) == 8
    assert fit_batch_size(footprint(1000, 100, 30, 1.0), limit=64) == 30
    # Not even one sample fits: batch 1 is tried (the estimate is an upper one).
    assert fit_batch_size(footprint(100, 200, 30), limit=64) == 1
    with pytest.raises(ValueError):
        fit_batch_size(footprint(1000, 0, 1), limit=0)


def test_the_setting_is_an_integer_or_auto():
    for good in (1, 16, "auto", "AUTO"):
        check_batch_setting(good)
    assert is_auto_batch("auto") and not is_auto_batch(16)
    for bad in (0, -2, "big", 2.5, True):
        with pytest.raises(ConfigError, match="integer >= 1 or 'auto'"):
            check_batch_setting(bad)


@pytest.fixture(scope="module")
def llama():
    model = make_tiny_model("llama")
    return model, family_for_model_type("llama")


def test_byte_counts_match_the_shapes(llama):
    model, family = llama
    c = model.config
    d, f, h, vocab, layers = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.vocab_size,
        c.num_hidden_layers,
    )
    kv = c.num_key_value_heads * (d // h)
    t, act, g = 32, 4, 8  # float32 activations, float64 Grams
    # inputs: attention in, attention out, MLP in (d each), MLP hidden (f);
    # outputs: q d, k kv, v kv, o d, up f, gate f, down d
    layer = act * t * (3 * d + (3 * d + f) + (d + 2 * kv + d + 2 * f + d))
    expected = layer + act * 2 * h * t * t + g * t * f + (act + 4) * t * vocab
    assert sample_bytes(model, family, t, "float64") == expected
    per_layer = g * (3 * d * d + f * f)
    assert gram_bytes(model, family, "float64") == (per_layer * layers, per_layer)
    block = sum(p.numel() * 4 for p in family.layers(model)[0].parameters())
    reserve = batching.RESERVE_BYTES
    assert resident_bytes(model, family, "float64", False) == reserve + per_layer * layers
    assert resident_bytes(model, family, "float64", False, "cpu") == reserve + per_layer
    assert resident_bytes(model, family, "float64", True) == reserve + per_layer + block
    # bfloat16 activations halve the activation terms, not the hooks' float64 copy
    half = sample_bytes(model, family, t, "float64", forward_bytes=2)
    assert half == expected - (layer + act * 2 * h * t * t) // 2 - 2 * t * vocab


def test_the_choice_reads_the_free_memory_and_the_footprint(llama):
    model, family = llama
    ids = torch.zeros(10, 16, dtype=torch.long)
    per_sample = sample_bytes(model, family, 16, "float32")
    resident = resident_bytes(model, family, "float32", sequential=False)
    free = int((resident + 3.5 * per_sample) / 0.5)
    choice = choose_batch_size(
        model, family, ids, torch.device("cpu"), "float32", 0.5, False, free=free
    )
    assert choice.batch_size == 3 and choice.limit == 10
    assert choice.footprint == footprint(free, resident, per_sample, 0.5)
    assert choice.summary()["batch_size"] == 3
    # hidden states waiting on the device count against the same free memory
    on_device = choose_batch_size(
        model,
        family,
        ids,
        torch.device("cpu"),
        "float32",
        0.5,
        True,
        hidden_on_device=True,
        free=free,
    )
    d = model.config.hidden_size
    assert on_device.footprint.resident == (
        resident_bytes(model, family, "float32", sequential=True) + 2 * 10 * 16 * d * 4
    )
    # the real free memory of this machine: at least one sample, at most every sample
    real = choose_batch_size(model, family, ids, torch.device("cpu"), "float32", 0.85, False)
    assert 1 <= real.batch_size <= 10 and real.footprint.free > 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_offloaded_grams_equal_the_resident_ones(llama, dtype):
    torch.manual_seed(0)
    batches = [torch.randn(3, 16, 24) for _ in range(4)]
    resident, offloaded = GramAccumulator(dtype), GramAccumulator(dtype, store="cpu")
    for x in batches:
        resident.add(x)
        offloaded.add(x)
    assert offloaded.gram.device == torch.device("cpu") and offloaded.tokens == resident.tokens
    flat = torch.cat([x.reshape(-1, 24) for x in batches]).to(F64)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for acc in (resident, offloaded):
        torch.testing.assert_close(acc.gram.to(F64), flat.T @ flat, rtol=tol, atol=tol)

    model, family = llama
    ids = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(2))
    full = collect_grams(model, family, ids, 2, dtype)
    off = collect_forward([GRAM], model, family, ids, 2, dtype, gram_store="cpu")["gram"]
    assert off.grams.keys() == full.grams.keys()
    for key, gram in full.grams.items():
        torch.testing.assert_close(off.grams[key], gram, rtol=tol, atol=tol)


def _compose(model_dir, mirror, *overrides):
    return compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        "eval=ppl",
        "eval.max_windows=2",
        "eval.ppl_datasets=[wikitext2]",
        *overrides,
    )


def _run(model_dir, mirror, out, *overrides):
    cfg = _compose(
        model_dir,
        mirror,
        "method=svd_llm",
        "method.update=layerwise",
        "ratio=0.4",
        "ratio_tolerance=0.05",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        f"paths.cache_dir={out}/cache",
        *overrides,
    )
    return pipeline.run(cfg, out_dir=out)


def test_auto_runs_exactly_as_the_size_it_chose(tiny_model_dir, tiny_mirror, tmp_path, monkeypatch):
    """With the free memory set to hold 3 samples, ``auto`` picks 3, records why, and gives the
    numbers of ``model.calib_batch_size=3`` (the calibration pass and the update's passes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    family = family_for_model_type("llama")
    per_sample = sample_bytes(model, family, 32, "float32")
    resident = resident_bytes(model, family, "float32", sequential=False)
    free = int((resident + 3.5 * per_sample) / 0.85)
    monkeypatch.setattr(batching, "free_bytes", lambda device: free)

    auto = _run(tiny_model_dir, tiny_mirror, tmp_path / "auto", "model.calib_batch_size=auto")
    fixed = _run(tiny_model_dir, tiny_mirror, tmp_path / "fixed", "model.calib_batch_size=3")
    batch = auto["calibration"]["batch"]
    assert batch["batch_size"] == 3 and batch["auto"] and batch["free"] == free
    assert (batch["resident"], batch["per_sample"]) == (resident, per_sample)
    assert "batch" not in fixed["calibration"]
    ppl = [r["metrics"]["perplexity"]["wikitext2"] for r in (auto, fixed)]
    assert ppl[0] == ppl[1]
    assert auto["method_info"]["update"]["error_after"] == pytest.approx(
        fixed["method_info"]["update"]["error_after"], rel=1e-12
    )


def test_gram_device_cpu_gives_the_same_run(tiny_model_dir, tiny_mirror, tmp_path):
    resident = _run(tiny_model_dir, tiny_mirror, tmp_path / "dev", "model.calib_batch_size=4")
    offloaded = _run(
        tiny_model_dir,
        tiny_mirror,
        tmp_path / "cpu",
        "model.calib_batch_size=4",
        "calibration.gram_device=cpu",
    )
    assert offloaded["calibration"]["gram_device"] == "cpu"
    ppl = [r["metrics"]["perplexity"]["wikitext2"] for r in (resident, offloaded)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6)


def test_bad_batch_settings_fail_at_composition(tiny_model_dir, tiny_mirror, tmp_path):
    from basis_sharing.config import check_config

    for override, match in [
        ("model.calib_batch_size=0", "integer >= 1 or 'auto'"),
        ("calibration.memory_fraction=1.5", r"must be in \(0, 1\]"),
        ("calibration.gram_device=gpu", "Valid choices"),
    ]:
        cfg = _compose(tiny_model_dir, tiny_mirror, override)
        with pytest.raises(ConfigError, match=match):
            check_config(cfg)
