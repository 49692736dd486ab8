"""Gram calibration in one process vs data-parallel over Gloo processes, one thread each.

A random LLaMA built in code (default: hidden 256, 4 layers, MLP 688, 4 heads, vocabulary 1024)
and random calibration ids (default 64 samples x 128 tokens, batches of 8) are the same in every
process (fixed seeds). Each condition runs in fresh processes with one thread each:

* ``one_process``: ``collect_forward([GRAM], ...)`` over every batch, as ``python run.py`` does;
* ``gloo_<N>``: N ranks in a Gloo process group (what ``torchrun --nproc_per_node=N`` sets up),
  each passing its shard of the batches, then the all-reduce of every Gram and count.

Each condition does one untimed warm-up pass, then ``--repeats`` timed passes; a data-parallel
pass is timed on rank 0 from a barrier before it to a barrier after it (so the slowest rank and
the reduction count). The JSON holds every pass's wall time, the medians, their ratio, and how far
the reduced Grams are from the single process's (relative to the largest entry; the order of the
cross-rank sum differs). The benchmark asserts nothing about speed: on a machine whose cores are
busy with other work, the ranks compete with it (the load average before and after is recorded).

Reproduce::

    OMP_NUM_THREADS=1 python scripts/bench_distributed.py \\
        --json results/benchmarks/bench_distributed_cpu.json

Tiny smoke run::

    python scripts/bench_distributed.py --hidden 32 --layers 2 --samples 4 --seq-len 8 \\
        --batch-size 2 --repeats 1 --json /tmp/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# scripts/ is not a package and basis_sharing need not be installed: run from a checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.calibration.grams import GRAM  # noqa: E402
from basis_sharing.calibration.statistics import collect_forward  # noqa: E402
from basis_sharing.models.families import get_family  # noqa: E402
from basis_sharing.runtime import distributed  # noqa: E402
from basis_sharing.tracking.environment import git_state  # noqa: E402

log = logging.getLogger("bench_distributed")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time Gram calibration in one process and over N Gloo processes."
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (2.6875 x)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--gram-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--nproc", type=int, default=2, help="Gloo processes (>= 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = round(args.hidden * 2.6875)  # LLaMA-7B's 11008 / 4096
    if min(args.hidden, args.layers, args.heads, args.samples, args.seq_len) < 1:
        parser.error("sizes must be >= 1")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    if args.nproc < 2:
        parser.error("--nproc must be >= 2 (the one-process condition always runs)")
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1")
    n_batches = -(-args.samples // args.batch_size)
    if n_batches < args.nproc:
        parser.error(f"{n_batches} batches cannot be split over {args.nproc} processes")
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq_len),
    )
    return AutoModelForCausalLM.from_config(config).eval()


def calibration_ids(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=generator)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of a condition: warm-up, timed passes; rank 0 saves times and Grams."""
    torch.set_num_threads(1)
    if size > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(size),
            LOCAL_RANK=str(rank),
        )
    world = distributed.init("cpu", "gloo")
    try:
        model, family, ids = build_model(args), get_family("llama"), calibration_ids(args)

        def calibrate(rows: torch.Tensor):
            grams = collect_forward(
                [GRAM], model, family, rows, args.batch_size, args.gram_dtype, desc="", world=world
            )
            return grams["gram"]

        calibrate(ids[: args.batch_size * size])  # warm-up: allocator, kernels, first collective
        times = []
        for _ in range(args.repeats):
            if size > 1:
                dist.barrier()
            start = time.perf_counter()
            stats = calibrate(ids)
            if size > 1:
                dist.barrier()
            times.append(time.perf_counter() - start)
        if world.is_main:
            torch.save({"times": times, "grams": stats.grams, "tokens": stats.tokens}, out)
    finally:
        distributed.shutdown()


def run_condition(args: argparse.Namespace, size: int, directory: Path) -> dict[str, Any]:
    """``size`` fresh processes (forked where the platform can: no re-import of transformers)."""
    out = directory / f"world{size}.pt"
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(
        worker, args=(size, free_port(), args, str(out)), nprocs=size, start_method=method
    )
    return torch.load(out, weights_only=False)


def max_relative_difference(grams: dict, reference: dict) -> float:
    return max(
        float((grams[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        for key, ref in reference.items()
    )


def benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import transformers.models.llama.modeling_llama  # noqa: F401  (once here: forks inherit it)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        single = run_condition(args, 1, Path(tmp))
        parallel = run_condition(args, args.nproc, Path(tmp))
    load_after = os.getloadavg()
    one, many = statistics.median(single["times"]), statistics.median(parallel["times"])
    return {
        "benchmark": "bench_distributed",
        "command": " ".join(["python", "scripts/bench_distributed.py", *argv]),
        "model": {
            "family": "llama (random, built in code)",
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
        },
        "calibration": {
            "samples": args.samples,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "gram_dtype": args.gram_dtype,
            "tokens": single["tokens"],
        },
        "threads_per_process": 1,
        "repeats": args.repeats,
        "conditions": {
            "one_process": {"processes": 1, "wall_s": single["times"], "median_s": one},
            f"gloo_{args.nproc}": {
                "processes": args.nproc,
                "backend": "gloo",
                "wall_s": parallel["times"],
                "median_s": many,
            },
        },
        "speedup": one / many,  # one process's median over the data-parallel median
        "tokens_equal": parallel["tokens"] == single["tokens"],
        "max_gram_rel_diff": max_relative_difference(parallel["grams"], single["grams"]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "torch": torch.__version__,
        "git": git_state(),
    }


def report(summary: dict[str, Any]) -> str:
    lines = [f"{'condition':<14}{'processes':>10}{'median s':>10}  passes"]
    for name, c in summary["conditions"].items():
        passes = " ".join(f"{t:.3f}" for t in c["wall_s"])
        lines.append(f"{name:<14}{c['processes']:>10}{c['median_s']:>10.3f}  {passes}")
    lines.append(
        f"speedup (one process / data-parallel): {summary['speedup']:.3f}; reduced Grams vs one "
        f"process: max relative difference {summary['max_gram_rel_diff']:.2e}, tokens equal: "
        f"{summary['tokens_equal']}; load average before/after: "
        f"{summary['machine']['load_average_before'][0]:.2f} / "
        f"{summary['machine']['load_average_after'][0]:.2f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = benchmark(args, argv)
    print(report(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("Wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
