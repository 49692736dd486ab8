"""Inference speed and memory of a (compressed) model: docs/methods.md §7.3 and §7.4.

Forward throughput follows the Basis Sharing protocol: the first quarter of the WikiText-2
validation tokens cut into 32-token blocks, batches of them (512 on a GPU; a CPU-sized batch on a
CPU), warm-up forwards on the first batch, then every batch timed once with ``use_cache=False``;
throughput = batch x 32 / median time per batch. Generation throughput follows SVD-LLM's: greedy
decoding of a fixed number of new tokens at batch 1 from a short prompt, with the KV cache on.

A factorised projection computes (x B) C: k (d_in + d_out) multiply-adds per token against
d_in d_out for W. Above the break-even rank k* = d_in d_out / (d_in + d_out) it is slower than the
dense layer even when a shared basis makes it smaller; :func:`rank_above_break_even` finds those.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.generation import greedy_generate
from basis_sharing.modules import break_even_rank, compressed_modules

log = logging.getLogger(__name__)


def throughput_blocks(ids: torch.Tensor, seq_len: int = 32, fraction: float = 0.25) -> torch.Tensor:
    """The first ``fraction`` of the non-overlapping ``seq_len``-token blocks of ``ids``."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"throughput fraction={fraction} must be in (0, 1].")
    ids = ids.reshape(-1)
    n_blocks = ids.numel() // seq_len
    keep = int(n_blocks * fraction)
    if keep < 1:
        raise ConfigError(
            f"{ids.numel()} tokens give no {seq_len}-token throughput block in their first "
            f"{fraction:.0%}; use more text or a shorter seq_len."
        )
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)[:keep]


def default_batch_size(device: torch.device) -> int:
    """The paper's 512 on an accelerator; 16 sequences on a CPU."""
    return 512 if device.type == "cuda" else 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
    return sum(seen.values())


@dataclass
class ForwardThroughput:
    tokens_per_s: float
    median_batch_s: float
    batch_size: int
    seq_len: int
    n_batches: int
    warmup: int
    compiled: bool
    batch_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def forward_throughput(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    *,
    warmup: int = 10,
    max_batches: int | None = None,
    compile: bool = False,
) -> ForwardThroughput:
    """Median time of one forward pass per full batch of ``blocks`` (partial batches dropped)."""
    n_batches = blocks.shape[0] // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise ConfigError(
            f"{blocks.shape[0]} throughput blocks do not fill one batch of {batch_size}; "
            "lower eval.throughput.batch_size or raise eval.throughput.fraction."
        )
    device = model_device(model)
    forward = torch.compile(model) if compile else model
    batches = [blocks[i * batch_size : (i + 1) * batch_size].to(device) for i in range(n_batches)]
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                forward(input_ids=batches[0], use_cache=False)
            for batch in tqdm(batches, desc="forward throughput", unit="batch", leave=False):
                times.append(_timed(lambda b=batch: forward(input_ids=b, use_cache=False), device))
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return ForwardThroughput(
        tokens_per_s=batch_size * blocks.shape[1] / median,
        median_batch_s=median,
        batch_size=batch_size,
        seq_len=int(blocks.shape[1]),
        n_batches=n_batches,
        warmup=warmup,
        compiled=compile,
        batch_s=times,
    )


@dataclass
class GenerationThroughput:
    tokens_per_s: float
    median_run_s: float
    prompt_tokens: int
    new_tokens: int
    runs: int
    run_s: list[float]
    compiled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_throughput(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int = 128,
    runs: int = 3,
    compile: bool = False,
) -> GenerationThroughput:
    """New tokens per second of greedy batch-1 decoding (median of ``runs`` after one warm-up).

    ``compile``: static KV cache and a compiled decoding step (CUDA graphs on a GPU); the warm-up
    then decodes the full ``new_tokens``, so the timed runs reuse the compiled graphs.
    """
    if runs < 1 or new_tokens < 1:
        raise ConfigError("generation throughput needs runs >= 1 and new_tokens >= 1.")
    device = model_device(model)
    prompt = prompt.reshape(1, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            warm = new_tokens if compile else min(new_tokens, 8)
            greedy_generate(model, prompt, warm, compile=compile)  # warm-up (and compilation)
            times = [
                _timed(lambda: greedy_generate(model, prompt, new_tokens, compile=compile), device)
                for _ in tqdm(range(runs), desc="generation throughput", leave=False)
            ]
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return GenerationThroughput(
        tokens_per_s=new_tokens / median,
        median_run_s=median,
        prompt_tokens=int(prompt.shape[1]),
        new_tokens=new_tokens,
        runs=runs,
        run_s=times,
        compiled=compile,
    )


def rank_above_break_even(model: nn.Module) -> list[dict[str, Any]]:
    """Compressed projections whose rank makes them slower than the dense layer.

    Each module says where its break-even lies (``CompressedLinear.break_even_rank``).
    """
    slow = []
    for name, module in compressed_modules(model):
        limit = module.break_even_rank()
        if module.rank > limit:
            slow.append(
                {
                    "module": name,
                    "rank": module.rank,
                    "break_even": round(limit, 1),
                    "d_in": module.d_in,
                    "d_out": module.d_out,
                }
            )
    return slow


def summarize_break_even(slow: list[dict[str, Any]]) -> str:
    """One line per (d_in, d_out, rank) shape, for the warning."""
    shapes: dict[tuple[int, int, int], int] = {}
    for entry in slow:
        key = (entry["d_in"], entry["d_out"], entry["rank"])
        shapes[key] = shapes.get(key, 0) + 1
    return "; ".join(
        f"{n} x ({d_in}->{d_out}) at rank {r} > {break_even_rank(d_in, d_out):.0f}"
        for (d_in, d_out, r), n in sorted(shapes.items())
    )


def measure_speed(
    model: nn.Module,
    blocks: torch.Tensor,
    prompt: torch.Tensor,
    *,
    batch_size: int,
    warmup: int,
    max_batches: int | None,
    compile: bool,
    new_tokens: int,
    runs: int,
) -> dict[str, Any]:
    """Forward and generation throughput plus weight memory (and CUDA peak on a GPU)."""
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, Any] = {
        "forward": forward_throughput(
            model, blocks, batch_size, warmup=warmup, max_batches=max_batches, compile=compile
        ).as_dict(),
        "generation": generation_throughput(model, prompt, new_tokens, runs, compile).as_dict(),
        "weights_mb": round(weight_bytes(model) / 2**20, 1),
        "device": str(device),
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def speedups(dense: dict[str, Any], compressed: dict[str, Any]) -> dict[str, float]:
    """Compressed over dense: forward and generation tokens/s, and weight memory."""
    return {
        "forward": compressed["forward"]["tokens_per_s"] / dense["forward"]["tokens_per_s"],
        "generation": compressed["generation"]["tokens_per_s"]
        / dense["generation"]["tokens_per_s"],
        "weights_mb": compressed["weights_mb"] / dense["weights_mb"],
    }
