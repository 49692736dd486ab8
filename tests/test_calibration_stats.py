"""Calibration statistics: streaming Grams, hooks on every family, the on-disk cache."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from basis_sharing.calibration import (
    GramAccumulator,
    GramStats,
    collect_grams,
    load_or_collect,
    read_stats,
    save_stats,
    stats_key,
    stats_path,
)
from basis_sharing.calibration import grams as grams_module
from basis_sharing.calibration.grams import GRAM_BLOCK_WIDTH, GRAM_MAX_BLOCKS, gram_blocks
from basis_sharing.errors import ConfigError
from basis_sharing.models.families import MLP_IN, get_family

FAMILIES = ["llama", "mistral", "opt", "gpt2", "llama3", "qwen2", "gemma2"]
N_SAMPLES, SEQ_LEN = 6, 16


def _ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (N_SAMPLES, SEQ_LEN), generator=generator)


def _no_hooks_left(model: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        for m in model.modules()
    )


def _capture_every_kind(model, family, ids) -> dict[tuple[int, str], torch.Tensor]:
    """Oracle: store the input of every projection kind in one plain forward, then X^T X."""
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            store = captured.setdefault((index, kind), [])
            hook = (lambda s: lambda mod, args, out: s.append(args[0].detach().clone()))(store)
            handles.append(family.module(layer, kind).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    grams = {}
    for key, xs in captured.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        grams[key] = x.T @ x
    return grams


# ---------------------------------------------------------------- accumulator


def test_batched_gram_equals_gram_of_concatenation():
    torch.manual_seed(0)
    chunks = [torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(7, 12), torch.randn(1, 12)]
    acc = GramAccumulator(torch.float64)
    for chunk in chunks:
        acc.add(chunk)
    x = torch.cat([c.reshape(-1, 12).double() for c in chunks])
    torch.testing.assert_close(acc.gram, x.T @ x, atol=1e-10, rtol=0)
    assert acc.tokens == 15 + 7 + 1 == x.shape[0]
    assert acc.gram.dtype == torch.float64


def test_accumulator_never_accumulates_in_half():
    acc = GramAccumulator()
    acc.add(torch.randn(4, 8).half())
    assert acc.gram.dtype == torch.float32
    with pytest.raises(ConfigError, match="float16"):
        GramAccumulator(torch.float16)


def test_accumulator_rejects_a_different_width():
    acc = GramAccumulator()
    acc.add(torch.randn(4, 8))
    with pytest.raises(ValueError, match="width"):
        acc.add(torch.randn(4, 9))


@pytest.mark.parametrize("d", [1, 191, 192, 193, 576, 1536, 4096, 11008])
def test_gram_blocks_tile_the_width(d):
    blocks = gram_blocks(d)
    assert blocks[0][0] == 0 and blocks[-1][1] == d
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    assert len(blocks) <= GRAM_MAX_BLOCKS
    assert all(stop - start >= GRAM_BLOCK_WIDTH for start, stop in blocks[:-1])
    assert (len(blocks) == 1) == (d <= GRAM_BLOCK_WIDTH)
    with pytest.raises(ValueError, match="positive"):
        gram_blocks(0)


@pytest.mark.parametrize("store", [None, "cpu"])
def test_block_triangular_gram_is_the_whole_symmetric_product(monkeypatch, store):
    # Narrow blocks so that a small width is cut into 7: every block pair, the ragged last block,
    # and a read between adds (the lower blocks must be re-mirrored, not kept stale).
    monkeypatch.setattr(grams_module, "GRAM_BLOCK_WIDTH", 3)
    assert len(gram_blocks(20)) == 7
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 20, dtype=torch.float64) for _ in range(3)]
    acc = GramAccumulator(torch.float64, store=store)
    seen = []
    for x in batches:
        acc.add(x)
        seen.append(x.reshape(-1, 20))
        flat = torch.cat(seen)
        torch.testing.assert_close(acc.gram, flat.T @ flat, atol=1e-12, rtol=0)
        _assert_mirrored(acc.gram)
    assert acc.tokens == 30


def _assert_mirrored(gram):
    """Every block below the diagonal is the exact transpose of its upper twin."""
    for start, stop in gram_blocks(gram.shape[0])[:-1]:
        assert torch.equal(gram[stop:, start:stop], gram[start:stop, stop:].T)


@pytest.mark.parametrize("d", [576, 1536])
def test_block_triangular_gram_matches_a_full_float32_product(d):
    torch.manual_seed(1)
    x = torch.randn(256, d)
    acc = GramAccumulator(torch.float32)
    acc.add(x)
    assert len(gram_blocks(d)) > 1
    full = torch.zeros(d, d).addmm_(x.T, x)
    torch.testing.assert_close(acc.gram, full, atol=1e-4, rtol=1e-5)
    _assert_mirrored(acc.gram)


def test_setting_the_gram_replaces_it_whole():
    acc = GramAccumulator(torch.float64)
    acc.add(torch.randn(8, 400, dtype=torch.float64))
    replacement = torch.eye(400, dtype=torch.float64)
    acc.gram = replacement
    assert acc.gram is replacement and acc.device == torch.device("cpu")


# ---------------------------------------------------------------- hooks on every family


@pytest.mark.parametrize("block_width", [None, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_collect_grams_matches_independent_capture(name, block_width, monkeypatch):
    if block_width is not None:  # several blocks even at the tiny models' widths
        monkeypatch.setattr(grams_module, "GRAM_BLOCK_WIDTH", block_width)
    family = get_family(name)
    model = make_tiny_model(name, dtype=torch.float64)
    ids = _ids()
    stats = collect_grams(model, family, ids, batch_size=4, accumulate_dtype=torch.float64)
    oracle = _capture_every_kind(model, family, ids)

    assert stats.tokens == N_SAMPLES * SEQ_LEN
    assert stats.dtype == "float64"
    n_layers = len(family.layers(model))
    inputs = family.kinds_by_input()
    assert set(stats.grams) == {(i, name) for i in range(n_layers) for name in inputs}
    for (layer, input_name), gram in stats.grams.items():
        assert gram.device.type == "cpu" and not gram.is_inference()
        kinds = inputs[input_name]
        d_in = family.shape(family.layers(model)[layer], kinds[0])[0]
        assert gram.shape == (d_in, d_in)
        for kind in kinds:  # every reader of a shared input has the very same Gram
            assert torch.equal(oracle[(layer, kind)], oracle[(layer, kinds[0])])
            torch.testing.assert_close(gram, oracle[(layer, kind)], atol=1e-10, rtol=1e-12)
    assert _no_hooks_left(model)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batch_size_does_not_change_the_grams(name):
    model = make_tiny_model(name, dtype=torch.float64)
    family = get_family(name)
    one = collect_grams(model, family, _ids(1), batch_size=1, accumulate_dtype="float64")
    six = collect_grams(model, family, _ids(1), batch_size=6, accumulate_dtype="float64")
    assert one.tokens == six.tokens == N_SAMPLES * SEQ_LEN
    for key, gram in one.grams.items():
        torch.testing.assert_close(gram, six.grams[key], atol=1e-9, rtol=0)


def test_fp32_model_gives_fp32_grams_and_restores_training_mode():
    model = make_tiny_model("opt").train()
    stats = collect_grams(model, get_family("opt"), _ids(), batch_size=3)
    assert stats.dtype == "float32"
    assert all(g.dtype == torch.float32 for g in stats.grams.values())
    assert model.training


def test_hooks_are_removed_when_the_forward_fails():
    model = make_tiny_model("llama")
    bad_ids = torch.full((2, 4), TINY_VOCAB + 5)  # out of the embedding's range
    with pytest.raises(IndexError):
        collect_grams(model, get_family("llama"), bad_ids, batch_size=2)
    assert _no_hooks_left(model)


def test_group_gram_is_the_float64_sum_of_its_layers():
    model = make_tiny_model("llama")
    stats = collect_grams(model, get_family("llama"), _ids(), batch_size=6)
    group = stats.group_gram([0, 1], MLP_IN)
    assert group.dtype == torch.float64
    expected = stats.gram(0, MLP_IN).double() + stats.gram(1, MLP_IN).double()
    assert torch.equal(group, expected)
    assert stats.gram(0, MLP_IN).dtype == torch.float32  # the stored Gram is not modified


# ---------------------------------------------------------------- cache


def _synthetic_stats(seed: int = 0) -> GramStats:
    generator = torch.Generator().manual_seed(seed)
    grams = {}
    for layer in range(2):
        for name, d in (("attn_in", 32), ("mlp_hidden", 64)):
            x = torch.randn(50, d, generator=generator)
            grams[(layer, name)] = x.T @ x
    return GramStats(grams=grams, tokens=50, dtype="float32")


class CountingCollect:
    def __init__(self, stats: GramStats) -> None:
        self.stats, self.calls = stats, 0

    def __call__(self) -> GramStats:
        self.calls += 1
        return self.stats


def _assert_same(a: GramStats, b: GramStats) -> None:
    assert a.tokens == b.tokens and a.dtype == b.dtype and set(a.grams) == set(b.grams)
    for key in a.grams:
        assert a.grams[key].dtype == b.grams[key].dtype
        assert torch.equal(a.grams[key], b.grams[key])


def _only_the_entry(cache_dir, key) -> bool:
    return sorted(p.name for p in (cache_dir / "stats").iterdir()) == [f"{key}.safetensors"]


def test_stats_key_is_canonical_and_sensitive():
    ident = {"model": "m", "revision": "abc", "dtype": "float32"}
    key = stats_key(ident, "h" * 64, "float32")
    assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert stats_key(dict(reversed(list(ident.items()))), "h" * 64, "float32") == key
    assert stats_key(ident, "h" * 64, torch.float32) == key
    assert stats_key({**ident, "revision": "abd"}, "h" * 64, "float32") != key
    assert stats_key(ident, "g" * 64, "float32") != key
    assert stats_key(ident, "h" * 64, "float64") != key


def test_second_call_is_a_hit_and_bitwise_equal(tmp_path):
    collect = CountingCollect(_synthetic_stats())
    first, hit = load_or_collect(tmp_path, "k1", collect, meta={"model": "tiny"})
    assert not hit and collect.calls == 1
    second, hit = load_or_collect(tmp_path, "k1", collect)
    assert hit and collect.calls == 1
    _assert_same(first, second)
    assert _only_the_entry(tmp_path, "k1")


def test_cache_round_trips_real_collected_stats(tmp_path):
    model = make_tiny_model("gpt2")

    def collect():
        return collect_grams(model, get_family("gpt2"), _ids(), batch_size=6)

    fresh, hit = load_or_collect(tmp_path, "gpt2", collect)
    cached, hit_again = load_or_collect(tmp_path, "gpt2", collect)
    assert (hit, hit_again) == (False, True)
    _assert_same(fresh, cached)


def _garbage_middle(path, byte: bytes) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = byte * 64
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_key(path) -> None:
    save_stats(path, _synthetic_stats(), "another-key")


def _missing_tensor(path) -> None:
    stats = _synthetic_stats()
    del stats.grams[(1, "attn_in")]
    save_stats(path, stats, path.stem)
    # the tensor list still names the dropped tensor, as a partly written file would
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["tensors"] = '["L0.attn_in", "L0.mlp_hidden", "L1.attn_in", "L1.mlp_hidden"]'
    save_file(tensors, str(path), metadata=meta)


def _nan_tensor(path) -> None:
    stats = _synthetic_stats()
    stats.grams[(0, "attn_in")][3, 3] = float("nan")
    save_stats(path, stats, path.stem)  # consistent checksum: only the finite check can catch it


# corruption -> (how to apply it, what the warning must say)
CORRUPTIONS = {
    "nan_bytes": (lambda p: _garbage_middle(p, b"\xff"), "non-finite"),
    # zeros are finite: only the checksum can see them
    "zero_bytes": (lambda p: _garbage_middle(p, b"\x00"), "sha256"),
    "truncated": (_truncate, "unreadable"),
    "not_safetensors": (lambda p: p.write_bytes(b"not a safetensors file"), "unreadable"),
    "empty": (lambda p: p.write_bytes(b""), "unreadable"),
    "other_key": (_other_key, "another-key"),
    "missing_tensor": (_missing_tensor, "L1.attn_in is missing"),
    "nan_tensor": (_nan_tensor, "L0.attn_in has non-finite"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_cache_file_is_recomputed_and_rewritten(tmp_path, caplog, corruption):
    good = _synthetic_stats()
    collect = CountingCollect(good)
    load_or_collect(tmp_path, "k1", collect)
    path = stats_path(tmp_path, "k1")
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(path)

    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        stats, hit = load_or_collect(tmp_path, "k1", collect)
    assert not hit and collect.calls == 2
    _assert_same(stats, good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0], warnings

    _assert_same(read_stats(path, "k1"), good)  # rewritten valid
    _, hit = load_or_collect(tmp_path, "k1", collect)
    assert hit and collect.calls == 2
    assert _only_the_entry(tmp_path, "k1")


def test_non_finite_statistics_are_not_cached(tmp_path, caplog):
    bad = _synthetic_stats()
    bad.grams[(1, "mlp_hidden")][0, 0] = float("inf")
    collect = CountingCollect(bad)
    with caplog.at_level(logging.WARNING, logger="basis_sharing.calibration"):
        _, hit = load_or_collect(tmp_path, "k1", collect)
    assert not hit and not stats_path(tmp_path, "k1").exists()
    assert any("non-finite" in r.getMessage() for r in caplog.records)


def test_forward_dtype_below_the_model_s_only():
    from conftest import compose_config

    from basis_sharing.config import check_config, forward_dtype

    assert forward_dtype(compose_config()) is None  # the model's dtype, as the paper
    assert forward_dtype(compose_config("calibration.forward_dtype=float32")) is None
    assert forward_dtype(compose_config("calibration.forward_dtype=bfloat16")) == "bfloat16"
    with pytest.raises(ConfigError, match="Valid choices"):
        check_config(compose_config("calibration.forward_dtype=int8"))
    with pytest.raises(ConfigError, match="load the model in float32"):
        check_config(compose_config("model.dtype=bfloat16", "calibration.forward_dtype=float32"))


def test_grams_under_autocast_are_the_lower_precision_activations_accumulated_in_float32():
    """Under bf16 autocast (calibration.forward_dtype) each Gram is exactly X^T X of the bf16
    activations the projections read, accumulated in float32 (not in bf16)."""
    from basis_sharing.calibration.grams import hooked_kinds

    model = make_tiny_model("llama")
    family = get_family("llama")
    ids = _ids()
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = [
        family.module(layer, kind).register_forward_hook(
            lambda _m, args, _o, key=(i, name): seen.setdefault(key, []).append(args[0])
        )
        for i, layer in enumerate(family.layers(model))
        for name, kind in hooked_kinds(family).items()
    ]
    with torch.autocast("cpu", torch.bfloat16):
        stats = collect_grams(model, family, ids, 3)
    for h in handles:
        h.remove()
    plain = collect_grams(model, family, ids, 3)
    lowered = 0
    for key, xs in seen.items():
        assert stats.grams[key].dtype == torch.float32
        oracle = torch.zeros_like(stats.grams[key])
        for x in xs:
            flat = x.reshape(-1, x.shape[-1]).float()
            oracle.addmm_(flat.T, flat)
        torch.testing.assert_close(stats.grams[key], oracle, rtol=1e-6, atol=1e-6)
        low = any(x.dtype == torch.bfloat16 for x in xs)
        lowered += int(low)
        gap = torch.linalg.matrix_norm(stats.grams[key] - plain.grams[key])
        assert gap < 0.05 * torch.linalg.matrix_norm(plain.grams[key])  # bf16 roundoff only
        if low:
            assert gap > 0
    assert lowered > 0  # at least the attention output and MLP hidden inputs ran in bf16


# ---------------------------------------------------------------- emulated low-precision forward

CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
CPUINFO_BF16 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp bf16\n"


@pytest.mark.parametrize(
    ("text", "dtype", "native"),
    [
        (CPUINFO_AVX2, "bfloat16", False),
        (CPUINFO_AVX2, "float16", False),
        (CPUINFO_BF16, "bfloat16", True),
        (CPUINFO_BF16, "float16", False),
        (CPUINFO_ARM, "bfloat16", True),
        (CPUINFO_ARM, "float16", True),
        ("processor\t: 0\n", "bfloat16", None),  # no flags line: unknown, not "emulated"
    ],
)
def test_cpu_flags_say_whether_a_dtype_runs_natively(tmp_path, text, dtype, native):
    from basis_sharing.calibration.statistics import cpu_runs_natively

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_runs_natively(dtype, cpuinfo) is native
    assert cpu_runs_natively(dtype, tmp_path / "missing") is None


def test_an_emulated_cpu_forward_is_warned_about(tmp_path, monkeypatch, caplog):
    from basis_sharing.calibration import statistics

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_AVX2)
    monkeypatch.setattr(statistics, "CPUINFO", cpuinfo)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=statistics.__name__):
        assert statistics.check_forward_device(cpu, "bfloat16") is False
    assert "without bfloat16 instructions" in caplog.text and "emulated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=statistics.__name__):
        assert statistics.check_forward_device(cpu, None) is None  # the model's dtype: no check
        assert statistics.check_forward_device(torch.device("meta"), "bfloat16") is None
    assert caplog.text == ""
    cpuinfo.write_text(CPUINFO_BF16)
    assert statistics.check_forward_device(cpu, "bfloat16") is True
