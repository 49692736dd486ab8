"""Calibration throughput against the hardware: tokens/s of the Gram pass and its FLOP fraction.

One process. First the device's measured matmul peak (``--peak-size`` square matmuls in float32,
and in ``--forward-dtype`` when given, median of repeats after warm-up). Then the embedded
SmolLM2-135M's calibration pass (``calibration.collect_statistics``'s Gram pass, runtime=full) on
``--n-samples`` x ``--seq-len`` tokens of the mirror's WikiText-2 validation split, timed, and
its arithmetic:

    forward  = 2 x (decoder projection weights + LM head) x tokens
               + 4 x layers x seq_len x hidden x tokens        (attention scores and values)
    Grams    = 2 x sum over layers and inputs of E(d_in) x tokens

E(d) being the Gram entries the accumulator computes (``gram_block_entries``: the upper block
triangle, about 56-67 % of d^2; docs/methods.md §2.2).

The report gives tokens/s, the achieved FLOP/s (forward + Grams over the wall time) and its
fraction of the measured peak (of the forward dtype's peak for the forward part).

Reproduce (the README's numbers)::

    python scripts/bench_calibration.py --threads 2 \\
        --json results/benchmarks/bench_calibration_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.calibration.grams import collect_grams, gram_block_entries  # noqa: E402
from basis_sharing.data.calibration import sample_calibration_blocks  # noqa: E402
from basis_sharing.evaluation.params import dense_projection_weights  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--forward-dtype", default=None, help="autocast dtype (bfloat16)")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def matmul_peak(size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul, median of ``repeats`` after warm-up."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def embedded_model_and_ids(args: argparse.Namespace):
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import basis_sharing.config  # noqa: F401  (the config schemas)
    import basis_sharing.finetune  # noqa: F401  (the fine-tuners' schemas)
    import basis_sharing.methods  # noqa: F401  (the methods' schemas)
    import basis_sharing.runtime  # noqa: F401  (the runtime options' schemas)
    from basis_sharing.data.corpora import load_corpus
    from basis_sharing.data.tokens import tokenize_text
    from basis_sharing.models.loading import resolve_source

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        cfg = compose("config", overrides=["model=smollm2_135m"])
    source = resolve_source(cfg.model, Path(cfg.paths.cache_dir).expanduser(), cfg.offline)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    text = load_corpus("wikitext2", "validation", args.data_dir).text()
    ids = sample_calibration_blocks(
        tokenize_text(tokenizer, text), args.n_samples, args.seq_len, 2023
    )
    return model, ids


def flops(model, family, tokens: int, seq_len: int, grams) -> dict[str, float]:
    config = model.config
    projections = dense_projection_weights(model, family)
    head = config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size
    forward = (2 * (projections + head) + attention) * tokens
    gram = 2 * sum(gram_block_entries(g.shape[0]) for g in grams.grams.values()) * tokens
    return {"forward": float(forward), "grams": float(gram)}


def main(argv: Sequence[str] | None = None) -> int:
    from basis_sharing.models.families import family_for_model_type

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = {"float32": matmul_peak(args.peak_size, torch.float32)}
    if args.forward_dtype:
        peak[args.forward_dtype] = matmul_peak(args.peak_size, getattr(torch, args.forward_dtype))
    model, ids = embedded_model_and_ids(args)
    family = family_for_model_type(model.config.model_type)
    autocast = args.forward_dtype
    collect_grams(model, family, ids[: args.batch_size], args.batch_size)  # warm-up
    start = time.perf_counter()
    with torch.autocast("cpu", getattr(torch, autocast or "float32"), autocast is not None):
        grams = collect_grams(model, family, ids, args.batch_size)
    wall = time.perf_counter() - start
    tokens = int(ids.numel())
    work = flops(model, family, tokens, args.seq_len, grams)
    forward_peak = peak[autocast or "float32"]
    # The time each part would take at its peak, summed: the wall time's floor.
    floor = work["forward"] / forward_peak + work["grams"] / peak["float32"]
    report: dict[str, Any] = {
        "benchmark": "calibration throughput (Gram pass) vs the measured matmul peak",
        "command": "python scripts/bench_calibration.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "forward_dtype": autocast or "float32",
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "gflop": {k: v / 1e9 for k, v in work.items()},
        "achieved_gflops": (work["forward"] + work["grams"]) / wall / 1e9,
        "fraction_of_peak": floor / wall,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
