"""ASVD activation scales and FWSVD Fisher rows: exact oracles on every family, and their cache."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, make_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from basis_sharing.calibration import load_or_collect, read_stats, save_stats
from basis_sharing.calibration.cache import (
    FORMAT_VERSION,
    StatsCacheError,
    stats_key,
    stats_path,
)
from basis_sharing.calibration.fisher import (
    FisherStats,
    collect_fisher,
    fisher_key,
    load_or_collect_fisher,
)
from basis_sharing.calibration.grams import GramStats
from basis_sharing.calibration.scales import (
    ScaleStats,
    collect_scales,
    load_or_collect_scales,
    scales_key,
)
from basis_sharing.errors import ConfigError
from basis_sharing.models.families import ATTN_IN, get_family

FAMILIES = ["llama", "mistral", "opt", "gpt2", "llama3", "qwen2", "gemma2"]
N_SAMPLES, SEQ_LEN, BATCH = 6, 16, 4  # two batches of 4 and 2 samples: uneven on purpose


def _ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (N_SAMPLES, SEQ_LEN), generator=generator)


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[s : s + batch_size] for s in range(0, ids.shape[0], batch_size)]


def _no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        for m in model.modules()
    )


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding, relative to the vector's scale."""
    assert actual.shape == expected.shape and actual.dtype == torch.float64
    atol = 1e-12 * max(expected.abs().max().item(), 1e-300)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- ASVD scales


def _inputs_per_batch(model, family, ids, batch_size) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Oracle capture: the input of every projection kind, one (tokens, d_in) tensor per batch."""
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            store = captured.setdefault((index, kind), [])
            hook = (lambda s: lambda mod, args, out: s.append(args[0].detach().clone()))(store)
            handles.append(family.module(layer, kind).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in _batches(ids, batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: [x.reshape(-1, x.shape[-1]) for x in xs] for key, xs in captured.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_scales_match_independent_capture(name):
    family = get_family(name)
    model = make_tiny_model(name, dtype=torch.float64)
    ids = _ids()
    stats = collect_scales(model, family, ids, batch_size=BATCH)
    captured = _inputs_per_batch(model, family, ids, BATCH)

    assert (stats.tokens, stats.batches) == (N_SAMPLES * SEQ_LEN, 2)
    inputs = family.kinds_by_input()
    n_layers = len(family.layers(model))
    expected_keys = {(i, input_name) for i in range(n_layers) for input_name in inputs}
    assert set(stats.abs_mean) == set(stats.abs_max) == expected_keys
    for (layer, input_name), kinds in ((k, inputs[k[1]]) for k in sorted(expected_keys)):
        d_in = family.shape(family.layers(model)[layer], kinds[0])[0]
        for kind in kinds:  # every reader of a shared input has the very same scales
            xs = captured[(layer, kind)]
            assert [x.shape[0] for x in xs] == [BATCH * SEQ_LEN, (N_SAMPLES - BATCH) * SEQ_LEN]
            mean = xs[0].abs().mean(0) + xs[1].abs().mean(0)  # ASVD-code: a sum of batch means
            peak = torch.cat(xs).abs().max(0).values
            _close(stats.scale(layer, input_name, "abs_mean"), mean)
            _close(stats.scale(layer, input_name, "abs_max"), peak)
        for table in (stats.abs_mean, stats.abs_max):
            vector = table[(layer, input_name)]
            assert vector.shape == (d_in,) and vector.device.type == "cpu"
            assert not vector.is_inference()
    assert _no_hooks_left(model)


def test_abs_mean_sums_batch_means_and_abs_max_ignores_batching():
    family = get_family("llama")
    model = make_tiny_model("llama", dtype=torch.float64)
    one = collect_scales(model, family, _ids(1), batch_size=N_SAMPLES)
    split = collect_scales(model, family, _ids(1), batch_size=1)
    assert (one.batches, split.batches) == (1, N_SAMPLES)
    for key in one.abs_mean:
        # equal-sized batches: the sum of N means is N times the overall mean
        _close(split.abs_mean[key], N_SAMPLES * one.abs_mean[key])
        assert torch.equal(split.abs_max[key], one.abs_max[key])


def test_fp32_scales_are_float64_and_training_mode_is_restored():
    model = make_tiny_model("opt").train()
    stats = collect_scales(model, get_family("opt"), _ids(), batch_size=BATCH)
    assert all(
        v.dtype == torch.float64 for v in (*stats.abs_mean.values(), *stats.abs_max.values())
    )
    assert model.training


def test_scale_lookup_errors():
    stats = collect_scales(make_tiny_model("gpt2"), get_family("gpt2"), _ids(), batch_size=BATCH)
    with pytest.raises(ConfigError, match="abs_max, abs_mean"):
        stats.scale(0, ATTN_IN, "abs_median")
    with pytest.raises(KeyError, match="layer 9"):
        stats.scale(9, ATTN_IN)


def test_scale_hooks_are_removed_when_the_forward_fails():
    model = make_tiny_model("llama")
    with pytest.raises(IndexError):
        collect_scales(model, get_family("llama"), torch.full((2, 4), TINY_VOCAB + 5), 2)
    assert _no_hooks_left(model)


# ---------------------------------------------------------------- FWSVD Fisher rows


def _fisher_oracle(model, family, ids, batch_size) -> dict[tuple[int, str], torch.Tensor]:
    """Plain autograd per batch on the shifted-token cross-entropy, squared, summed over outputs.

    The output dimension is read from the module type (not from the family adapter's layout).
    """
    from transformers.pytorch_utils import Conv1D

    modules = {
        (i, kind): family.module(layer, kind)
        for i, layer in enumerate(family.layers(model))
        for kind in family.kinds
    }
    keys = list(modules)
    weights = [modules[key].weight for key in keys]
    was_training = model.training
    model.eval()
    rows: dict[tuple[int, str], torch.Tensor] = {}
    for batch in _batches(ids, batch_size):
        logits = model(input_ids=batch, use_cache=False).logits
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, weights)
        for key, grad in zip(keys, grads, strict=True):
            out_dim = 1 if isinstance(modules[key], Conv1D) else 0
            assert isinstance(modules[key], (Conv1D, nn.Linear))
            squared = grad.double().pow(2).sum(dim=out_dim)
            rows[key] = rows[key] + squared if key in rows else squared
    model.train(was_training)
    return rows


@pytest.mark.parametrize("name", FAMILIES)
def test_fisher_rows_match_plain_autograd(name):
    family = get_family(name)
    model = make_tiny_model(name, dtype=torch.float64)
    ids = _ids()
    stats = collect_fisher(model, family, ids, batch_size=BATCH)
    oracle = _fisher_oracle(model, family, ids, BATCH)

    assert (stats.batches, stats.tokens) == (2, N_SAMPLES * SEQ_LEN)
    assert set(stats.rows) == set(oracle)
    for key, row in stats.rows.items():
        layer = family.layers(model)[key[0]]
        assert row.shape == (family.shape(layer, key[1])[0],) and row.device.type == "cpu"
        assert (row > 0).all()
        _close(stats.row(*key), oracle[key])
    if name == "gpt2":  # Conv1D stores W itself: the rows run over its first dimension
        c_attn = family.module(family.layers(model)[0], "attn")
        assert tuple(c_attn.weight.shape) == (64, 192)
        assert stats.row(0, "attn").shape == (64,)
    if name == "mistral":  # GQA: k's rows are d_in = 64 long even though d_out is 16
        assert stats.row(0, "k").shape == (64,)


def test_fisher_depends_on_the_batching():
    """Squaring after the batch mean: one batch of 6 is not two batches of 4 and 2."""
    family = get_family("llama")
    model = make_tiny_model("llama", dtype=torch.float64)
    split = collect_fisher(model, family, _ids(), batch_size=BATCH)
    whole = collect_fisher(model, family, _ids(), batch_size=N_SAMPLES)
    assert whole.batches == 1
    _close(whole.row(0, "q"), _fisher_oracle(model, family, _ids(), N_SAMPLES)[(0, "q")])
    assert not torch.allclose(split.row(0, "q"), whole.row(0, "q"))


def _model_state(model: nn.Module):
    return (
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [(n, m.training) for n, m in model.named_modules()],
    )


def test_collect_fisher_restores_flags_grads_and_modes_and_runs_in_eval():
    family = get_family("opt")  # OPT has dropout: a training-mode pass would not match the oracle
    model = make_tiny_model("opt", dtype=torch.float64).train()
    model.model.decoder.layers[1].eval()  # a mixed mode must come back as it was
    model.model.decoder.embed_tokens.weight.requires_grad_(False)
    sentinel = torch.ones_like(model.model.decoder.layers[0].fc1.bias)
    model.model.decoder.layers[0].fc1.bias.grad = sentinel
    before_flags, before_modes = _model_state(model)

    seen: list[tuple[bool, bool, bool]] = []  # (embedding, fc1 bias, fc1 weight) requires_grad

    def spy(module, args, output):
        fc1 = model.model.decoder.layers[0].fc1
        seen.append((module.weight.requires_grad, fc1.bias.requires_grad, fc1.weight.requires_grad))

    handle = model.model.decoder.embed_positions.register_forward_hook(spy)
    try:
        stats = collect_fisher(model, family, _ids(), batch_size=BATCH)
    finally:
        handle.remove()

    assert seen == [(False, False, True)] * 2  # only the projection weights are tracked
    after_flags, after_modes = _model_state(model)
    assert after_modes == before_modes
    for (name, flag, grad), (name_after, flag_after, grad_after) in zip(
        before_flags, after_flags, strict=True
    ):
        assert name == name_after and flag == flag_after, name
        assert grad_after is grad, name  # None stays None, the sentinel is the same object
    assert model.model.decoder.layers[0].fc1.bias.grad is sentinel
    assert _no_hooks_left(model)

    oracle = _fisher_oracle(model, family, _ids(), BATCH)  # in eval mode
    for key, row in stats.rows.items():
        _close(row, oracle[key])


def test_collect_fisher_restores_the_model_when_the_pass_fails():
    model = make_tiny_model("llama").train()
    before = _model_state(model)
    with pytest.raises(IndexError):
        collect_fisher(model, get_family("llama"), torch.full((2, 4), TINY_VOCAB + 5), 2)
    assert _model_state(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_collect_fisher_refuses_inference_mode():
    model = make_tiny_model("gpt2")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        collect_fisher(model, get_family("gpt2"), _ids(), batch_size=BATCH)


# ---------------------------------------------------------------- cache

IDENT = {"model": "tiny", "revision": "abc", "dtype": "float64"}
CALIB = "h" * 64


class CountingCollect:
    def __init__(self, stats) -> None:
        self.stats, self.calls = stats, 0

    def __call__(self):
        self.calls += 1
        return self.stats


@pytest.fixture(scope="module")
def real_scales() -> ScaleStats:
    return collect_scales(
        make_tiny_model("gpt2", dtype=torch.float64), get_family("gpt2"), _ids(), 4
    )


@pytest.fixture(scope="module")
def real_fisher() -> FisherStats:
    return collect_fisher(
        make_tiny_model("mistral", dtype=torch.float64), get_family("mistral"), _ids(), 4
    )


def _assert_same_scales(a: ScaleStats, b: ScaleStats) -> None:
    assert (a.tokens, a.batches) == (b.tokens, b.batches)
    for table_a, table_b in ((a.abs_mean, b.abs_mean), (a.abs_max, b.abs_max)):
        assert set(table_a) == set(table_b)
        for key in table_a:
            assert table_a[key].dtype == table_b[key].dtype
            assert torch.equal(table_a[key], table_b[key])


def _assert_same_fisher(a: FisherStats, b: FisherStats) -> None:
    assert (a.tokens, a.batches) == (b.tokens, b.batches) and set(a.rows) == set(b.rows)
    for key in a.rows:
        assert a.rows[key].dtype == b.rows[key].dtype and torch.equal(a.rows[key], b.rows[key])


# stat -> (fixture name, load_or_collect function, equality check)
KINDS = {
    "scales": ("real_scales", load_or_collect_scales, _assert_same_scales),
    "fisher": ("real_fisher", load_or_collect_fisher, _assert_same_fisher),
}


@pytest.mark.parametrize("stat", list(KINDS))
def test_cache_round_trip_is_bitwise(tmp_path, request, stat):
    fixture, load, same = KINDS[stat]
    collect = CountingCollect(request.getfixturevalue(fixture))
    first, hit = load(tmp_path, "k1", collect, meta={"model": "tiny"})
    assert not hit and collect.calls == 1
    second, hit = load(tmp_path, "k1", collect)
    assert hit and collect.calls == 1
    same(first, second)
    same(second, collect.stats)
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["k1.safetensors"]


def _garbage_middle(path, byte: bytes) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = byte * 64
    path.write_bytes(bytes(data))


def _rewrite_metadata(path, **changes) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, **changes})


def _drop_first_tensor(path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = json.loads(meta["tensors"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != names[0]}
    save_file(tensors, str(path), metadata=meta)


# corruption -> (how to apply it, what the warning must say)
CORRUPTIONS = {
    "zero_bytes": (lambda p: _garbage_middle(p, b"\x00"), "sha256"),
    "nan_bytes": (lambda p: _garbage_middle(p, b"\xff"), "non-finite"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "other_stat": (lambda p: _rewrite_metadata(p, stat="grams"), "holds stat 'grams'"),
    "other_version": (lambda p: _rewrite_metadata(p, format_version="0"), "format version"),
    "missing_tensor": (_drop_first_tensor, "is missing"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("stat", list(KINDS))
def test_a_bad_cache_file_is_recomputed_with_a_warning(tmp_path, request, caplog, stat, corruption):
    fixture, load, same = KINDS[stat]
    good = request.getfixturevalue(fixture)
    collect = CountingCollect(good)
    load(tmp_path, "k1", collect)
    path = stats_path(tmp_path, "k1")
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(path)

    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        stats, hit = load(tmp_path, "k1", collect)
    assert not hit and collect.calls == 2
    same(stats, good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0], warnings

    again, hit = load(tmp_path, "k1", collect)  # rewritten valid
    assert hit and collect.calls == 2
    same(again, good)


def test_a_file_of_one_statistic_is_a_miss_for_another(tmp_path, real_scales, real_fisher, caplog):
    load_or_collect_scales(tmp_path, "shared", CountingCollect(real_scales))
    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        _, hit = load_or_collect_fisher(tmp_path, "shared", CountingCollect(real_fisher))
    assert not hit and any("'scales', not 'fisher'" in r.getMessage() for r in caplog.records)
    with pytest.raises(StatsCacheError, match="not 'grams'"):
        read_stats(stats_path(tmp_path, "shared"), "shared")


def test_non_finite_scales_are_not_cached(tmp_path, real_scales, caplog):
    bad = ScaleStats(
        abs_mean={k: v.clone() for k, v in real_scales.abs_mean.items()},
        abs_max=real_scales.abs_max,
        tokens=real_scales.tokens,
        batches=real_scales.batches,
    )
    bad.abs_mean[(0, ATTN_IN)][0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        _, hit = load_or_collect_scales(tmp_path, "k1", CountingCollect(bad))
    assert not hit and not stats_path(tmp_path, "k1").exists()
    assert any("abs_mean.L0.attn_in" in r.getMessage() for r in caplog.records)


def test_keys_differ_per_statistic_and_batch_size():
    grams = stats_key(IDENT, CALIB, "float64")
    scales = scales_key(IDENT, CALIB, batch_size=4)
    fisher = fisher_key(IDENT, CALIB, batch_size=4)
    assert len({grams, scales, fisher}) == 3
    assert scales_key(IDENT, CALIB, 4) == scales
    assert scales_key(IDENT, CALIB, 1) != scales and fisher_key(IDENT, CALIB, 1) != fisher
    assert scales_key({**IDENT, "revision": "abd"}, CALIB, 4) != scales
    assert fisher_key(IDENT, "g" * 64, 4) != fisher


def test_gram_keys_are_unchanged_so_old_caches_stay_valid():
    payload = {
        "model": IDENT,
        "calibration": CALIB,
        "accumulate_dtype": "float32",
        "format_version": FORMAT_VERSION,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert stats_key(IDENT, CALIB, "float32") == hashlib.sha256(canonical.encode()).hexdigest()[:24]


def test_a_gram_file_written_before_stat_names_still_loads(tmp_path):
    grams = {(0, ATTN_IN): torch.eye(4), (1, ATTN_IN): 2 * torch.eye(4)}
    stats = GramStats(grams=grams, tokens=10, dtype="float32")
    path = stats_path(tmp_path, "old")
    save_stats(path, stats, "old")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "stat"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)  # exactly what the previous writer produced

    loaded, hit = load_or_collect(tmp_path, "old", lambda: pytest.fail("should be a hit"))
    assert hit and all(torch.equal(loaded.grams[k], grams[k]) for k in grams)


def _legacy_gram_file(path, grams: dict, tokens: int, key: str) -> None:
    """A Gram file exactly as the writer before the shared format produced it."""
    entries = sorted(grams)
    tensors = {f"L{i}.{name}": grams[(i, name)].contiguous() for i, name in entries}
    digest = hashlib.sha256()
    for tensor in tensors.values():
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    metadata = {
        "format": "pt",
        "key": key,
        "format_version": str(FORMAT_VERSION),
        "tokens": str(tokens),
        "dtype": "float32",
        "entries": json.dumps([[i, name] for i, name in entries]),
        "sha256": digest.hexdigest(),
        "meta": "{}",
        "stat": "grams",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def test_a_gram_file_of_the_earlier_layout_is_still_a_verified_hit(tmp_path, caplog):
    grams = {(0, ATTN_IN): torch.eye(4), (1, ATTN_IN): 3 * torch.eye(4)}
    path = stats_path(tmp_path, "legacy")
    _legacy_gram_file(path, grams, 12, "legacy")
    loaded, hit = load_or_collect(tmp_path, "legacy", lambda: pytest.fail("should be a hit"))
    assert hit and loaded.tokens == 12 and loaded.dtype == "float32"
    assert set(loaded.grams) == set(grams)
    assert all(torch.equal(loaded.grams[k], grams[k]) for k in grams)

    _legacy_gram_file(path, {**grams, (1, ATTN_IN): 4 * torch.eye(4)}, 12, "legacy")
    with safe_open(str(path), framework="pt") as f:  # the checksum of the earlier content
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["L1.attn_in"] = 3 * torch.eye(4)
    save_file(tensors, str(path), metadata=meta)
    fresh = GramStats(grams=grams, tokens=12, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        _, hit = load_or_collect(tmp_path, "legacy", CountingCollect(fresh))
    assert not hit and any("sha256" in r.getMessage() for r in caplog.records)
    with safe_open(str(path), framework="pt") as f:
        assert "tensors" in f.metadata()  # rewritten in the shared layout
