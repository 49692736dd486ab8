"""Folding a batch into a Gram: the whole product X^T X against the upper block triangle.

``calibration.grams.GramAccumulator`` accumulates only the blocks on and above the diagonal
(``gram_blocks``: at most 8 column blocks of at least 192) and mirrors the rest when the Gram is
read (docs/methods.md §2.2). For each input width, in one process and alternating the two ways,
this folds ``--batches`` batches of ``--tokens`` random activations (float32 unless ``--dtype``)
into a Gram both ways, reads the result, and reports the median wall time of each way, their
ratio, the share of multiply-adds the triangle needs, and whether the two Grams are equal bit for
bit (and otherwise their largest relative difference).

Widths: ``smollm2`` (576: q/k/v, o and up/gate inputs; 1536: down's) and ``llama7b`` (4096,
11008).

Reproduce (the numbers in the README; the timings need an otherwise idle machine)::

    python scripts/bench_gram_fold.py --threads 2 --json results/benchmarks/bench_gram_fold_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.calibration.grams import (  # noqa: E402
    GramAccumulator,
    gram_block_entries,
    gram_blocks,
)

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="instead of --shape")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--batches", type=int, default=4, help="batches folded per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per way (median)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    return parser.parse_args(argv)


def fold_full(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The previous accumulator's work: one whole addmm_ per batch."""
    d = batches[0].shape[1]
    gram = torch.zeros(d, d, dtype=batches[0].dtype)
    for x in batches:
        gram.addmm_(x.T, x)
    return gram


def fold_triangle(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = GramAccumulator(batches[0].dtype)
    for x in batches:
        acc.add(x)
    return acc.gram


def timed(fold, batches: Sequence[torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    gram = fold(batches)
    return time.perf_counter() - start, gram


def measure(d: int, args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(d)
    batches = [
        torch.randn(args.tokens, d, generator=generator, dtype=dtype) for _ in range(args.batches)
    ]
    times: dict[str, list[float]] = {"full": [], "triangle": []}
    grams = {}
    for _ in tqdm(range(args.repeats), desc=f"width {d}", leave=False):
        for name, fold in (("full", fold_full), ("triangle", fold_triangle)):
            seconds, grams[name] = timed(fold, batches)
            times[name].append(seconds)
    full, triangle = (statistics.median(times[name]) for name in ("full", "triangle"))
    difference = (grams["triangle"] - grams["full"]).abs().max() / grams["full"].abs().max()
    return {
        "width": d,
        "blocks": len(gram_blocks(d)),
        "multiply_share": round(gram_block_entries(d) / d**2, 4),
        "full_s": times["full"],
        "triangle_s": times["triangle"],
        "median_full_s": full,
        "median_triangle_s": triangle,
        "speedup": full / triangle,
        "bit_identical": bool(torch.equal(grams["full"], grams["triangle"])),
        "max_relative_difference": float(difference),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = args.widths or list(SHAPES[args.shape])
    results = [measure(d, args) for d in widths]
    report = {
        "benchmark": "gram_fold",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "tokens_per_batch": args.tokens,
        "batches": args.batches,
        "repeats": args.repeats,
        "widths": results,
    }
    for row in results:
        print(
            f"width {row['width']:>6} ({row['blocks']} blocks, {row['multiply_share']:.0%} of the "
            f"multiplies): full {row['median_full_s']:.3f} s, triangle "
            f"{row['median_triangle_s']:.3f} s, {row['speedup']:.2f}x, bit-identical "
            f"{row['bit_identical']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
