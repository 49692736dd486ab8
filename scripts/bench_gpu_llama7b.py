"""Basis Sharing on a LLaMA-7B-shaped model with random weights, on a GPU.

Checks the paper's rank table at full scale (docs/methods.md §3.6: q/k/v 2184, o 1638, up/gate
2762, down 2388 at 20 %, achieved 20.02 %) and measures where the time and memory go when
statistics and float64 decompositions run on the accelerator. The model is built in code (random
weights, so perplexities mean nothing); calibration blocks are random token ids.

Reproduce (needs a CUDA GPU with ~60 GB)::

    python scripts/bench_gpu_llama7b.py --ratios 0.2 0.5 --n-samples 32 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

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
from basis_sharing.methods.basis_sharing import (  # noqa: E402
    BasisSharing,
    BasisSharingMethodConfig,
)
from basis_sharing.methods.registry import CompressionContext  # noqa: E402
from basis_sharing.models.families import get_family  # noqa: E402

log = logging.getLogger("bench_gpu_llama7b")


def llama7b(device: torch.device, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def timed(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda")
    family = get_family("llama")
    ids = torch.randint(
        0, 32000, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    report: dict = {"gpu": torch.cuda.get_device_name(device), "args": vars(args) | {"json": None}}
    model, t, mem = timed(lambda: llama7b(device, args.layers), device)
    report["build_s"], report["build_peak_gib"] = t, mem
    stats, t, mem = timed(lambda: collect_grams(model, family, ids, args.batch_size), device)
    report["calibrate_s"], report["calibrate_peak_gib"] = t, mem
    report["calibration_tokens"] = stats.tokens
    cfg = OmegaConf.merge(
        OmegaConf.structured(BasisSharingMethodConfig),
        {"name": "basis_sharing", "decomposition_cache_mb": 0},
    )
    runs = []
    for ratio in args.ratios:
        if runs:  # a fresh dense model: the same seed gives the same weights
            del model
            torch.cuda.empty_cache()
            model = llama7b(device, args.layers)
        ctx = CompressionContext(ratio=ratio, device=device, stats={"gram": stats})
        dense = dense_projection_weights(model, family)
        info, t, mem = timed(
            lambda m=model, c=ctx: BasisSharing(cfg).compress(m, family, c), device
        )
        kept = count_projection_weights(model, family)
        ranks: dict[str, int] = {}
        for g in info["groups"]:
            ranks.setdefault(g["kind"], g["rank"])
        runs.append(
            {
                "ratio": ratio,
                "compress_s": t,
                "compress_peak_gib": mem,
                "achieved_ratio": 1 - kept / dense,
                "planned_equals_counted": kept == info["planned_params"]["kept"],
                "ranks": ranks,
                "whitening_fallbacks": info["whitening_fallbacks"],
            }
        )
        log.info("ratio %.2f: %s", ratio, runs[-1])
    report["runs"] = runs
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
