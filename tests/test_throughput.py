"""Throughput protocol, break-even ranks, weight memory and greedy generation samples."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from basis_sharing.errors import ConfigError
from basis_sharing.evaluation import throughput
from basis_sharing.evaluation.generation import generation_samples, greedy_generate
from basis_sharing.evaluation.throughput import (
    break_even_rank,
    forward_throughput,
    generation_throughput,
    rank_above_break_even,
    speedups,
    throughput_blocks,
    weight_bytes,
)
from basis_sharing.modules import (
    LowRankLinear,
    SharedBasisLinear,
    basis_linear,
    coefficient_linear,
    shared_bases,
)


def test_blocks_are_the_first_quarter_of_the_32_token_blocks():
    ids = torch.arange(1000)
    blocks = throughput_blocks(ids, seq_len=32, fraction=0.25)
    # 1000 tokens give 31 full blocks; the first quarter is int(31 / 4) = 7 of them.
    assert blocks.shape == (7, 32)
    assert torch.equal(blocks, torch.arange(7 * 32).view(7, 32))
    with pytest.raises(ConfigError, match="no 32-token throughput block"):
        throughput_blocks(torch.arange(100), seq_len=32, fraction=0.25)


class RecordingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self.modes: list[bool] = []

    def forward(self, input_ids, use_cache=True):
        self.calls.append((input_ids.clone(), use_cache))
        self.modes.append(self.training)
        return input_ids


class FakeClock:
    """perf_counter returning start/stop pairs with the given durations."""

    def __init__(self, durations: list[float]) -> None:
        self.ticks = [t for d in durations for t in (0.0, d)]

    def perf_counter(self) -> float:
        return self.ticks.pop(0)


def test_forward_throughput_is_batch_tokens_over_the_median_batch_time(monkeypatch):
    model = RecordingModel()
    blocks = torch.arange(11 * 4).view(11, 4)
    monkeypatch.setattr(throughput, "time", FakeClock([3.0, 1.0, 2.0]))
    result = forward_throughput(model, blocks, batch_size=3, warmup=2)
    # 11 blocks fill 3 batches of 3 (the partial one is dropped); warm-up runs the first batch.
    assert result.n_batches == 3 and result.batch_s == [3.0, 1.0, 2.0]
    assert result.median_batch_s == 2.0 and result.tokens_per_s == 3 * 4 / 2.0
    seen = [ids for ids, _ in model.calls]
    assert len(seen) == 5 and all(not cache for _, cache in model.calls)
    assert torch.equal(seen[0], blocks[:3]) and torch.equal(seen[1], blocks[:3])
    for i in range(3):
        assert torch.equal(seen[2 + i], blocks[3 * i : 3 * i + 3])
    assert model.modes == [False] * 5 and model.training  # eval while timed, then restored


def test_max_batches_and_too_few_blocks(monkeypatch):
    model = RecordingModel()
    monkeypatch.setattr(throughput, "time", FakeClock([1.0]))
    result = forward_throughput(
        model, torch.zeros(9, 4, dtype=torch.long), 3, warmup=0, max_batches=1
    )
    assert result.n_batches == 1 and len(model.calls) == 1
    with pytest.raises(ConfigError, match="do not fill one batch of 16"):
        forward_throughput(model, torch.zeros(9, 4, dtype=torch.long), 16)


def test_generation_produces_exactly_the_requested_tokens(monkeypatch):
    model = make_tiny_model("llama", seed=1)
    calls = []
    original = throughput.greedy_generate

    def spy(m, prompt, new_tokens, **kw):
        out = original(m, prompt, new_tokens, **kw)
        calls.append(out.shape[1] - prompt.shape[1])
        return out

    monkeypatch.setattr(throughput, "greedy_generate", spy)
    result = generation_throughput(model, torch.tensor([5, 6, 7, 8]), new_tokens=12, runs=3)
    assert calls == [8, 12, 12, 12]  # one short warm-up, then three timed runs of exactly 12
    assert result.tokens_per_s == pytest.approx(12 / result.median_run_s)
    assert result.prompt_tokens == 4 and len(result.run_s) == 3


def test_generation_samples_are_the_greedy_argmax_continuation(tiny_tokenizer):
    model = make_tiny_model("llama", seed=2)
    prompts = ["the king of the north", "a song"]
    samples = generation_samples(model, tiny_tokenizer, prompts, max_new_tokens=6)
    eos = model.config.eos_token_id
    for prompt, sample in zip(prompts, samples, strict=True):
        ids = tiny_tokenizer(prompt)["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(6):  # greedy decoding by hand, no cache
                nxt = int(model(torch.tensor([ids + expected])).logits[0, -1].argmax())
                expected.append(nxt)
                if nxt == eos:
                    break
        assert sample["prompt"] == prompt and sample["new_token_ids"] == expected
        assert sample["completion"] == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    out = greedy_generate(model, torch.tensor([[1, 2, 3]]), 5)
    assert out.shape == (1, 8)


def low_rank(d_in: int, d_out: int, rank: int) -> LowRankLinear:
    return LowRankLinear(
        basis_linear(torch.randn(d_in, rank), torch.float32),
        coefficient_linear(torch.randn(rank, d_out), None, torch.float32),
    )


def test_ranks_above_break_even_are_found():
    # 64 -> 32: break-even rank 64 * 32 / 96 = 21.33.
    assert break_even_rank(64, 32) == pytest.approx(64 * 32 / 96)
    model = nn.Module()
    model.fast = low_rank(64, 32, 21)
    model.slow = low_rank(64, 32, 22)
    registry = shared_bases(model)
    registry["q_g0"] = basis_linear(torch.randn(64, 40), torch.float32)
    model.shared = SharedBasisLinear(
        registry, "q_g0", coefficient_linear(torch.randn(40, 64), None, torch.float32)
    )  # 64 -> 64: break-even 32
    slow = rank_above_break_even(model)
    assert [(s["module"], s["rank"]) for s in slow] == [("slow", 22), ("shared", 40)]
    assert slow[1]["break_even"] == 32.0


def test_weight_bytes_count_a_shared_basis_once():
    model = nn.Module()
    registry = shared_bases(model)
    registry["b"] = basis_linear(torch.randn(8, 4), torch.float32)
    model.a = SharedBasisLinear(
        registry, "b", coefficient_linear(torch.randn(4, 8), None, torch.float32)
    )
    model.c = SharedBasisLinear(
        registry, "b", coefficient_linear(torch.randn(4, 8), None, torch.float32)
    )
    model.register_buffer("scale", torch.zeros(3, dtype=torch.float16))
    assert weight_bytes(model) == (8 * 4 + 2 * 4 * 8) * 4 + 3 * 2


def test_speedups_are_compressed_over_dense():
    dense = {
        "forward": {"tokens_per_s": 100.0},
        "generation": {"tokens_per_s": 10.0},
        "weights_mb": 8.0,
    }
    comp = {
        "forward": {"tokens_per_s": 150.0},
        "generation": {"tokens_per_s": 12.0},
        "weights_mb": 6.0,
    }
    assert speedups(dense, comp) == {"forward": 1.5, "generation": 1.2, "weights_mb": 0.75}


@pytest.mark.slow
def test_compiled_decoding_of_a_compressed_model_gives_the_eager_tokens(monkeypatch):
    """eval.throughput.compile: a static KV cache and transformers' compiled decoding step on a
    model with a shared basis; greedy tokens equal the eager ones, the warm-up (compilation)
    decodes the full length and the result says it was compiled."""
    from omegaconf import OmegaConf

    from basis_sharing.calibration.grams import collect_grams
    from basis_sharing.methods.basis_sharing import BasisSharing, BasisSharingMethodConfig
    from basis_sharing.methods.registry import CompressionContext
    from basis_sharing.models.families import family_for_model_type

    model = make_tiny_model("llama", seed=1)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    ctx = CompressionContext(
        ratio=0.4, device=torch.device("cpu"), stats={"gram": collect_grams(model, family, ids, 2)}
    )
    cfg = OmegaConf.merge(OmegaConf.structured(BasisSharingMethodConfig), {"name": "basis_sharing"})
    BasisSharing(cfg).compress(model, family, ctx)
    assert shared_bases(model)
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        eager = greedy_generate(model.eval(), prompt, 10)
        compiled = greedy_generate(model, prompt, 10, compile=True)
    assert torch.equal(compiled, eager)
    calls = []
    original = throughput.greedy_generate

    def spy(m, p, new_tokens, **kw):
        calls.append((new_tokens, kw.get("compile")))
        return original(m, p, new_tokens, **kw)

    monkeypatch.setattr(throughput, "greedy_generate", spy)
    result = generation_throughput(model, prompt[0], new_tokens=10, runs=2, compile=True)
    assert calls == [(10, True)] * 3 and result.compiled
