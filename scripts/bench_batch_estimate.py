"""The ``model.calib_batch_size=auto`` estimate against the measured memory of the calibration pass.

For each ``--batch-sizes`` value, a fresh process loads the embedded SmolLM2-135M (float32),
then runs the Gram pass of ``runtime=full`` over one batch of ``--seq-len`` tokens while a thread
samples the process's resident memory every millisecond. The measured growth (peak RSS during the
pass less the RSS before it) is compared with what ``calibration.batching`` predicts for that
batch: the resident Grams plus batch x the per-sample estimate. On a GPU the same is measured with
``torch.cuda.max_memory_allocated`` (``--device cuda``).

A fresh process per batch keeps the allocator's cached memory of one measurement out of the next.
RSS also counts the CPU allocator's own overheads, so this is the check that matters for the
CPU: is the estimate an upper bound of what the pass really takes?

Reproduce::

    python scripts/bench_batch_estimate.py --threads 1 \\
        --json results/benchmarks/bench_batch_estimate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child
    return parser.parse_args(argv)


def measure_one(args: argparse.Namespace) -> dict:
    """In this (fresh) process: the estimate and the measured growth for batch ``args.one``."""
    import psutil
    import torch
    from bench_calibration import embedded_model_and_ids

    from basis_sharing.calibration.batching import resident_bytes, sample_bytes
    from basis_sharing.calibration.grams import collect_grams
    from basis_sharing.models.families import family_for_model_type

    torch.set_num_threads(args.threads)
    batch = args.one
    ns = argparse.Namespace(n_samples=batch, seq_len=args.seq_len, data_dir=args.data_dir)
    model, ids = embedded_model_and_ids(ns)
    device = torch.device(args.device)
    model.to(device)
    family = family_for_model_type(model.config.model_type)
    process = psutil.Process()
    peak, running = [process.memory_info().rss], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = process.memory_info().rss
        peak[0] = before
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
    start = time.perf_counter()
    collect_grams(model, family, ids, batch, "float32")
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        running[0] = False
        watcher.join()
        measured = peak[0] - before
    resident = resident_bytes(model, family, "float32", sequential=False)
    per_sample = sample_bytes(model, family, args.seq_len, "float32")
    return {
        "batch_size": batch,
        "measured_growth_bytes": int(measured),
        "estimated_bytes": int(resident + batch * per_sample),
        "resident_estimate_bytes": int(resident),
        "per_sample_estimate_bytes": int(per_sample),
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return 0
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(batch),
            "--seq-len",
            str(args.seq_len),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--data-dir",
            str(args.data_dir),
        ]
        env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'scripts'}:{REPO_ROOT}"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        measured = max(row["measured_growth_bytes"], 1)
        row["estimate_over_measured"] = row["estimated_bytes"] / measured
        rows.append(row)
        print(
            f"batch {batch}: measured {row['measured_growth_bytes'] / 2**20:.0f} MiB, "
            f"estimated {row['estimated_bytes'] / 2**20:.0f} MiB "
            f"({row['estimate_over_measured']:.2f}x)"
        )
    report = {
        "device": args.device,
        "model": "SmolLM2-135M-Instruct (embedded), float32, runtime=full Gram pass",
        "seq_len": args.seq_len,
        "threads": args.threads,
        "load_average": list(os.getloadavg()),
        "rows": rows,
        "every_estimate_an_upper_bound": all(
            r["estimated_bytes"] >= r["measured_growth_bytes"] for r in rows
        ),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
