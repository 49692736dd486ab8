"""Issue 14's GPU goal in one command: a LLaMA-7B-shaped model on one GPU, runtime=sequential.

What it measures, in one process (a random-weight model built in code; perplexities would mean
nothing, so none are computed):

1. **Calibration**: the Grams of ``--n-samples`` x ``--seq-len`` random token ids (the paper's
   256 x 2048 by default) collected block by block (``runtime=sequential``: the float16 weights
   stay on the CPU, one decoder layer at a time on the GPU, the hidden states wait on the CPU),
   optionally under ``--forward-dtype`` autocast.
2. **Decompositions for every ratio**: Basis Sharing (group_size 2, the paper's shared kinds) at
   each of ``--ratios`` on a fresh copy of the dense weights, each group decomposed on the GPU in
   float64 with ``method.decomposition=--decomposition``; the sweep's in-process cache reuses a
   ratio-independent decomposition across ratios when ``--cache-mb`` holds it.
3. **Peak GPU memory** over 1-2 (``torch.cuda.max_memory_allocated``). Goal: calibration plus all
   decompositions for the 4 ratios in <= 5 minutes, peak <= 24 GB.
4. **Decoding** at the last ratio (50 % by default): batch-1 greedy generation of ``--new-tokens``
   after a 4-token prompt, dense and compressed, each eager and compiled (static KV cache, CUDA
   graphs: ``eval.throughput.compile``). Goal: compressed >= 1.3x dense with compile.

Reproduce (one H100/H200-class GPU; the model's weights take 13.5 GB of host memory)::

    python scripts/bench_gpu_7b_goal.py --json results/benchmarks/bench_gpu_7b_goal.json

CPU smoke run of the same code path (a small LLaMA, seconds)::

    python scripts/bench_gpu_7b_goal.py --device cpu --hidden 128 --mlp 344 --heads 4 \\
        --layers 2 --n-samples 4 --seq-len 64 --new-tokens 8 --json /tmp/goal.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from basis_sharing.calibration.grams import collect_grams  # noqa: E402
from basis_sharing.evaluation.params import (  # noqa: E402
    count_projection_weights,
    dense_projection_weights,
)
from basis_sharing.evaluation.throughput import generation_throughput  # noqa: E402
from basis_sharing.methods.basis_sharing import (  # noqa: E402
    BasisSharing,
    BasisSharingMethodConfig,
)
from basis_sharing.methods.caches import SweepCaches  # noqa: E402
from basis_sharing.methods.registry import CompressionContext  # noqa: E402
from basis_sharing.models.families import get_family  # noqa: E402
from basis_sharing.runtime.sequential import BlockRunner  # noqa: E402

log = logging.getLogger("bench_gpu_7b_goal")
GIB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--batch-size",
        default="8",
        help="calibration samples per pass, or auto (model.calib_batch_size=auto's choice)",
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", default="float16", help="the model's weights")
    parser.add_argument("--forward-dtype", default=None, help="calibration autocast (bfloat16)")
    parser.add_argument(
        "--decomposition", default="gram_eigh", choices=["svd", "gram_eigh", "auto"]
    )
    parser.add_argument("--cache-mb", type=float, default=0, help="decomposition reuse budget")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Random LLaMA weights on the CPU in ``--dtype`` (seeded: every call gives the same).

    ``args.kv_heads`` and ``args.vocab``, where given (``bench_plus_timing.py``), set GQA and the
    vocabulary; else LLaMA-7B's (as many KV heads as heads, 32000 tokens).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=getattr(args, "vocab", 32000),
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=getattr(args, "kv_heads", args.heads),
        max_position_embeddings=max(args.seq_len, 2048),
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # built in it: no float32 copy of 7B
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def method(decomposition: str, cache_mb: float) -> BasisSharing:
    cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig),
        {
            "name": "basis_sharing",
            "decomposition": decomposition,
            "decomposition_cache_mb": cache_mb,
        },
    )
    return BasisSharing(cfg)


def calibrate(model, family, args, device) -> tuple[Any, float]:
    ids = torch.randint(0, 32000, (args.n_samples, args.seq_len), generator=torch.Generator())
    runner = BlockRunner(model, family, device, hidden_device=torch.device("cpu"))
    autocast = args.forward_dtype
    batch = batch_size(model, family, ids, device, args)
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, getattr(torch, autocast or "float32"), autocast is not None):
        stats = collect_grams(model, family, ids, batch, "float32", runner=runner)
    sync(device)
    return stats, time.perf_counter() - start


def batch_size(model, family, ids, device, args) -> int:
    """``--batch-size``, or with ``auto`` what ``calibration.batching`` chooses for
    runtime=sequential (logged, and stored in ``args.batch_choice``)."""
    if str(args.batch_size).lower() != "auto":
        return int(args.batch_size)
    from basis_sharing.calibration.batching import choose_batch_size

    forward = getattr(torch, args.forward_dtype).itemsize if args.forward_dtype else 0
    choice = choose_batch_size(
        model, family, ids, device, "float32", 0.85, True, forward_bytes=forward
    )
    args.batch_choice = choice.summary()
    log.info("calibration batch size auto: %s", args.batch_choice)
    return choice.batch_size


def decoding(model, device, args) -> dict[str, Any]:
    prompt = torch.randint(0, 32000, (4,), generator=torch.Generator().manual_seed(1))
    model.to(device)
    result = {
        mode: generation_throughput(
            model, prompt, args.new_tokens, args.runs, compile=mode == "compiled"
        ).as_dict()
        for mode in ("eager", "compiled")
    }
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    family = get_family("llama")
    dense = build_model(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats, calibration_s = calibrate(dense, family, args, device)
    tokens = args.n_samples * args.seq_len
    log.info("calibration: %.1f s (%.0f tokens/s)", calibration_s, tokens / calibration_s)
    caches = SweepCaches()
    bs = method(args.decomposition, args.cache_mb)
    ratios, compressed = [], None
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        ctx = CompressionContext(
            ratio=ratio,
            device=device,
            stats={"gram": stats},
            stats_key="bench_gpu_7b_goal",
            caches=caches,
        )
        sync(device)
        start = time.perf_counter()
        bs.compress(model, family, ctx)
        sync(device)
        seconds = time.perf_counter() - start
        achieved = 1 - count_projection_weights(model, family) / dense_projection_weights(
            dense, family
        )
        ratios.append({"ratio": ratio, "achieved": achieved, "decompose_s": seconds})
        log.info("ratio %.2f (achieved %.4f): %.1f s", ratio, achieved, seconds)
        compressed = model
    decompose_s = sum(r["decompose_s"] for r in ratios)
    report: dict[str, Any] = {
        "benchmark": "issue 14 GPU goal: LLaMA-7B-shaped, runtime=sequential, 4 ratios",
        "command": "python scripts/bench_gpu_7b_goal.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration_s": calibration_s,
        "calibration_tokens_per_s": tokens / calibration_s,
        "ratios": ratios,
        "decompose_s_all_ratios": decompose_s,
        "calibration_plus_decompositions_s": calibration_s + decompose_s,
        "goal_5_min_met": calibration_s + decompose_s <= 300,
        "peak_gpu_gb": peak_gb(device),
        "goal_24_gb_met": None if device.type != "cuda" else peak_gb(device) <= 24,
    }
    if not args.no_generation and compressed is not None:
        del stats
        report["generation_dense"] = decoding(dense, device, args)
        report["generation_compressed"] = decoding(compressed, device, args)
        d, c = report["generation_dense"], report["generation_compressed"]
        report["generation_speedup"] = {
            mode: c[mode]["tokens_per_s"] / d[mode]["tokens_per_s"]
            for mode in ("eager", "compiled")
        }
        report["goal_1_3x_met"] = report["generation_speedup"]["compiled"] >= 1.3
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
