"""Issue 13's compression-time bound on any device: basis_sharing_plus against plain Basis Sharing.

The bound: the compression stage of ``method=basis_sharing_plus`` within 3x that of plain
``method=basis_sharing`` at 20 %. On the embedded model it is measured by one Hydra sweep (README
"Compression-time goal"); this script measures the same two ``compress`` calls on a model built in
code, so it runs where the embedded model's file cannot travel (a GPU machine): random weights of
a chosen shape, random calibration token ids, the Grams collected once and shared by both methods
(as the sweep shares its cached calibration), each method timed on a fresh copy of the dense
model, ``--repeats`` times, alternating. No perplexity is computed (the weights are random), and
``shared=auto`` decides on random weights, so the kinds it shares may differ from the real
model's (the record says which); the time depends mostly on the shapes, the ranks and the
calibration tokens, which are the real model's.

Reproduce::

    python scripts/bench_plus_timing.py --device cuda \
        --json results/benchmarks/bench_plus_timing_smollm2_cuda.json
    python scripts/bench_plus_timing.py --shape llama7b --device cuda --runtime sequential \\
        --json results/benchmarks/bench_plus_timing_llama7b_cuda.json
    python scripts/bench_plus_timing.py --device cpu --forward-dtype bfloat16 \\
        --json results/benchmarks/bench_plus_timing_smollm2_cpu_bf16.json

CPU smoke run (seconds)::

    python scripts/bench_plus_timing.py --device cpu --hidden 64 --mlp 172 --heads 4 --kv-heads 2 \\
        --layers 4 --n-samples 4 --seq-len 32 --repeats 1 --json /tmp/plus.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_gpu_7b_goal import build_model, sync  # noqa: E402  (scripts/ is on sys.path)
from omegaconf import OmegaConf  # noqa: E402

from basis_sharing.calibration.grams import collect_grams  # noqa: E402
from basis_sharing.calibration.statistics import forward_autocast  # noqa: E402
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
from basis_sharing.runtime.sequential import BlockRunner  # noqa: E402

log = logging.getLogger("bench_plus_timing")
PRESET = REPO / "conf" / "method" / "basis_sharing_plus.yaml"
# (hidden, mlp, layers, heads, kv heads, vocab): the embedded model's and LLaMA-7B's.
SHAPES = {
    "smollm2": (576, 1536, 30, 9, 3, 49152),
    "llama7b": (4096, 11008, 32, 32, 32, 32000),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    for name in ("hidden", "mlp", "layers", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides --shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runtime", choices=["full", "sequential"], default="full")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--n-samples", type=int, default=64, help="the embedded model's 64")
    parser.add_argument("--seq-len", type=int, default=512, help="the embedded model's 512")
    parser.add_argument("--batch-size", type=int, default=8, help="the embedded model's 8")
    parser.add_argument("--dtype", default="float32", help="the model's weights")
    parser.add_argument(
        "--forward-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="calibration.forward_dtype: autocast of the calibration and the refit's forwards",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timings per method")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = dict(
        zip(
            ("hidden", "mlp", "layers", "heads", "kv_heads", "vocab"),
            SHAPES[args.shape],
            strict=True,
        )
    )
    for key, value in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")
    return args


def method_configs() -> dict[str, Any]:
    """Plain Basis Sharing and the preset, its options read from its own config file."""
    preset = OmegaConf.to_container(OmegaConf.load(PRESET))
    preset.pop("defaults", None)
    schema = OmegaConf.structured(BasisSharingMethodConfig)
    return {
        "basis_sharing": OmegaConf.merge(schema, {"name": "basis_sharing"}),
        "basis_sharing_plus": OmegaConf.merge(schema, {"name": "basis_sharing", **preset}),
    }


def runner_for(model, family, args, device) -> BlockRunner | None:
    if args.runtime == "full":
        return None
    return BlockRunner(model, family, device, hidden_device=torch.device("cpu"))


def time_compress(dense, family, cfg, ids, stats, args, device) -> tuple[float, dict]:
    """One ``compress`` of a fresh copy of ``dense``: (seconds, the method's record)."""
    model = copy.deepcopy(dense)
    if args.runtime == "full":
        model.to(device)
    ctx = CompressionContext(
        ratio=args.ratio,
        device=device,
        calibration_ids=ids,
        stats={"gram": stats},
        calib_batch_size=args.batch_size,
        runner=runner_for(model, family, args, device),
        forward_dtype=args.forward_dtype,
    )
    sync(device)
    start = time.perf_counter()
    info = BasisSharing(cfg).compress(model, family, ctx)
    sync(device)
    seconds = time.perf_counter() - start
    info["achieved"] = 1 - count_projection_weights(model, family) / dense_projection_weights(
        dense, family
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, info


def summary(info: dict) -> dict:
    """What the report keeps of a method record: the kinds it shared, the ratio, the refit."""
    kept = {k: info[k] for k in ("shared_kinds", "private_kinds", "achieved") if k in info}
    if "sharing" in info:
        kept["sharing"] = {r["kind"]: r["choice"] for r in info["sharing"]}
    update = info.get("update")
    if update:
        kept["update"] = {k: update.get(k) for k in ("mode", "tokens", "replayed_layers")}
        if "forward_dtype" in update:
            kept["update"]["forward_dtype"] = update["forward_dtype"]
        kept["first_pass_decomposed"] = info.get("first_pass_decomposed")
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    family = get_family("llama")
    dense = build_model(args)
    ids = torch.randint(
        0, args.vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    calib_model = dense if args.runtime == "sequential" else copy.deepcopy(dense).to(device)
    sync(device)
    start = time.perf_counter()
    with forward_autocast(device, args.forward_dtype):  # as the calibrate stage runs it
        stats = collect_grams(
            calib_model,
            family,
            ids,
            args.batch_size,
            runner=runner_for(calib_model, family, args, device),
        )
    sync(device)
    calibration_s = time.perf_counter() - start
    del calib_model
    log.info("calibration: %.1f s", calibration_s)
    configs = method_configs()
    times: dict[str, list[float]] = {name: [] for name in configs}
    records: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, cfg in configs.items():
            seconds, info = time_compress(dense, family, cfg, ids, stats, args, device)
            times[name].append(seconds)
            records[name] = summary(info)
            log.info("repeat %d %s: compress %.1f s", repeat, name, seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["basis_sharing_plus"] / median["basis_sharing"]
    report: dict[str, Any] = {
        "benchmark": "issue 13 time bound: basis_sharing_plus vs basis_sharing, random weights",
        "command": "python scripts/bench_plus_timing.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration_s": calibration_s,
        "compress_s": times,
        "compress_median_s": median,
        "plus_over_plain": ratio,
        "goal_3x_met": ratio <= 3.0,
        "methods": records,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
