"""How the thread count changes the float64 decomposition, idle and next to a competing process.

Only the compression stage's linear algebra is timed: for each Basis Sharing group (default
SmolLM2-135M-like shapes: q/k/v/o-like 576 x 576 and up/gate-like 576 x 1536, two layers per
group) the Cholesky whitening of a fixed Gram (``linalg.whitening.whitening_factor``), the SVD of
S [W_1 | W_2] (``linalg.factorization.decompose_shared``) and the truncation to the 20% rank.
The Grams and weights are generated once from a seed and written to a file that every condition
reads, so no calibration runs and every condition decomposes the same matrices.

Each condition runs in a fresh worker process (a thread pool's size is fixed once used, and a
stalled worker can be stopped) that sizes its pools, decomposes one small warm-up group untimed,
then runs ``--repeats`` passes over the groups, streaming one JSON line per group. A condition
that exceeds ``--condition-timeout`` is stopped; what it finished is kept and it is marked
``timed_out``. Thread counts (all in one run):

* ``after``: what a run now picks unaided (``basis_sharing.threads.apply_threads(None)``: the
  smallest of affinity, cgroup quota, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS);
* ``before``: ``--oversubscribe`` (default 2) x that count. This emulates a quota-limited host
  whose ``os.cpu_count()`` exceeds the quota: torch sizes its pools from the machine's cores,
  not the quota, so it starts more busy threads than the process may run;
* ``one_free``: the count minus one (when above 1), leaving a CPU to the competitor;
* ``passive``: the ``after`` count with ``OMP_WAIT_POLICY=PASSIVE`` in the worker's environment
  (idle OpenMP threads sleep instead of spinning, which a competitor on the same CPUs punishes);
* ``unaided``: torch's own default in this process, measured only when it differs from the above.

Each count runs idle and next to one competing CPU-bound process (a single-threaded Python busy
loop started and stopped by this script, bounded to the condition's timeout plus a margin). The
benchmark asserts nothing about speed; it records every timing, the thread pools each worker
really had, the machine and the load average.

Reproduce (at most conditions x ``--condition-timeout`` seconds: 8 x 25 s on a 2-core machine;
run it when nothing else is running, the load average is recorded)::

    python scripts/bench_threads.py --json results/benchmarks/bench_threads_cpu.json

``--labels after before`` measures a subset of the counts.

Tiny smoke run::

    python scripts/bench_threads.py --groups 32x48x2 --repeats 1 --json /tmp/bench_threads.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# scripts/ is not a package and basis_sharing need not be installed: run from a checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from basis_sharing.linalg.factorization import decompose_shared, shared_rank  # noqa: E402
from basis_sharing.linalg.whitening import whitening_factor  # noqa: E402
from basis_sharing.threads import apply_threads, blas_pools, detect_allowed_cpus  # noqa: E402
from basis_sharing.tracking.environment import git_state  # noqa: E402

log = logging.getLogger("bench_threads")

DEFAULT_GROUPS = ("576x576x2", "576x1536x2")
LABELS = ("after", "before", "one_free", "passive", "unaided")
# The competitor outlives its condition by this much at most, even if this script is killed.
COMPETITOR_MARGIN_S = 10.0
SPIN = """
import signal, sys, time
def stop(*_):
    print(time.process_time(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
stop()
"""


@dataclass(frozen=True)
class GroupShape:
    """One Basis Sharing group: n layers' W (d_in, d_out) sharing one basis."""

    d_in: int
    d_out: int
    n: int

    @property
    def name(self) -> str:
        return f"{self.d_in}x{self.d_out}x{self.n}"


@dataclass(frozen=True)
class Condition:
    label: str  # after / before / one_free / passive / unaided
    threads: str  # a count, or "unaided" (the worker sets nothing)
    competitor: bool
    passive: bool = False  # OMP_WAIT_POLICY=PASSIVE in the worker's environment

    @property
    def name(self) -> str:
        return f"{self.label}{'+competitor' if self.competitor else ''}"


def parse_group(text: str) -> GroupShape:
    try:
        d_in, d_out, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group {text!r}: use D_INxD_OUTxN, e.g. 576x1536x2"
        ) from None
    if min(d_in, d_out, n) < 1:
        raise argparse.ArgumentTypeError(f"group {text!r}: every size must be >= 1")
    return GroupShape(d_in, d_out, n)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the float64 group decompositions per thread count, idle and loaded."
    )
    parser.add_argument(
        "--groups",
        type=parse_group,
        nargs="+",
        default=[parse_group(g) for g in DEFAULT_GROUPS],
        help="group shapes D_INxD_OUTxN (default: SmolLM2-135M-like %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the groups")
    parser.add_argument("--ratio", type=float, default=0.2, help="truncation rank's ratio")
    parser.add_argument("--oversubscribe", type=int, default=2, help="before = this x after")
    parser.add_argument(
        "--condition-timeout",
        type=float,
        default=25.0,
        help="seconds per condition, from the worker's start (its imports included)",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        choices=LABELS,
        default=list(LABELS),
        help="which thread counts to measure (after is always measured; default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.oversubscribe < 2:
        parser.error("--oversubscribe must be >= 2 (before must exceed after)")
    if args.condition_timeout <= 0:
        parser.error("--condition-timeout must be > 0")
    if not 0.0 <= args.ratio < 1.0:
        parser.error("--ratio must be in [0, 1)")
    return args


# ---- inputs ---------------------------------------------------------------------------------


def make_inputs(groups: Sequence[GroupShape], seed: int, path: Path) -> None:
    """A fixed float32 Gram and n weights per group, as a calibration and a model would give.

    The Gram comes from rows with decaying column scales (a realistic, well-defined spectrum);
    the weights are N(0, 0.02^2) like an initialised projection.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, g in enumerate(groups):
        scales = torch.logspace(0, -2, g.d_in)
        rows = torch.randn(max(2 * g.d_in, 64), g.d_in, generator=gen) * scales
        tensors[f"gram.{i}"] = rows.T @ rows
        for j in range(g.n):
            tensors[f"weight.{i}.{j}"] = torch.randn(g.d_in, g.d_out, generator=gen) * 0.02
    save_file(tensors, str(path))


# ---- worker (one condition, its own process) ------------------------------------------------


def emit(event: dict[str, Any]) -> None:
    """One JSON line to stdout, flushed: the parent keeps what a stopped worker wrote."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def pool_state() -> dict[str, Any]:
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "blas": blas_pools(),
    }


def size_pools(spec: str) -> dict[str, Any]:
    """Size the pools as the condition says; "auto" is exactly what a run does."""
    if spec == "unaided":
        return {"chosen": None, "source": "unaided", **pool_state()}
    return apply_threads(None if spec == "auto" else int(spec))


def decompose(gram: torch.Tensor, weights: list[torch.Tensor], ratio: float) -> dict[str, float]:
    """Whiten, decompose and truncate one group; wall and CPU seconds of each step."""
    d_in, d_out = weights[0].shape
    rank = max(1, shared_rank(d_in, d_out, len(weights), ratio))
    wall, cpu = time.perf_counter(), time.process_time()
    whitening = whitening_factor(gram)
    t_whiten = time.perf_counter()
    dec = decompose_shared(weights, whitening.S, whitening.shift)
    t_svd = time.perf_counter()
    dec.truncate(min(rank, dec.sigma.numel()))
    end = time.perf_counter()
    return {
        "whiten_s": round(t_whiten - wall, 5),
        "svd_s": round(t_svd - t_whiten, 5),
        "truncate_s": round(end - t_svd, 5),
        "total_s": round(end - wall, 5),
        "cpu_s": round(time.process_time() - cpu, 5),
    }


def worker(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    emit({"event": "threads", **size_pools(args.threads)})
    tensors = load_file(str(args.inputs))
    groups = [
        (tensors[f"gram.{i}"], [tensors[f"weight.{i}.{j}"] for j in range(g.n)])
        for i, g in enumerate(args.groups)
    ]
    warm = torch.eye(16) + 0.1
    decompose(warm, [torch.ones(16, 8)], args.ratio)  # first-use costs of LAPACK and the pools
    emit({"event": "start", "time": time.time()})
    for rep in range(args.repeats):
        for i, (gram, weights) in enumerate(groups):
            timing = decompose(gram, weights, args.ratio)
            emit({"event": "group", "pass": rep, "group": i, **timing})
    emit({"event": "done", "time": time.time()})
    return 0


# ---- parent: conditions, competitor, summary ------------------------------------------------


def thread_counts(oversubscribe: int, labels: Sequence[str]) -> dict[str, int]:
    """The counts measured, by label (see the module docstring); ``after`` is always there."""
    after = detect_allowed_cpus().count
    counts = {"after": after}
    if "before" in labels:
        counts["before"] = oversubscribe * after
    if "one_free" in labels and after > 1:
        counts["one_free"] = after - 1
    if "passive" in labels:
        counts["passive"] = after
    unaided = torch.get_num_threads()  # this process never sizes its pools
    if "unaided" in labels and unaided not in counts.values():
        counts["unaided"] = unaided
    return counts


def conditions(counts: dict[str, int]) -> list[Condition]:
    auto = ("after", "passive")
    specs = {label: ("auto" if label in auto else str(n)) for label, n in counts.items()}
    if "unaided" in specs:
        specs["unaided"] = "unaided"
    return [
        Condition(label, spec, competitor, passive=label == "passive")
        for competitor in (False, True)
        for label, spec in specs.items()
    ]


def start_competitor(seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SPIN, str(seconds)], stdout=subprocess.PIPE, text=True
    )


def stop_competitor(proc: subprocess.Popen) -> float | None:
    """Stop the busy loop; the CPU seconds it got (proof that it competed), None if unknown."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    try:
        return round(float(out.strip().splitlines()[-1]), 3)
    except (ValueError, IndexError):
        return None


def worker_command(args: argparse.Namespace, inputs: Path, spec: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--inputs",
        str(inputs),
        "--threads",
        spec,
        "--repeats",
        str(args.repeats),
        "--ratio",
        str(args.ratio),
        "--groups",
        *(g.name for g in args.groups),
    ]


def run_worker(
    command: list[str], timeout: float, out: Path, env: dict[str, str] | None = None
) -> tuple[list[dict], bool, float]:
    """Run one worker to completion or ``timeout``; (its events, timed out, stop time)."""
    with out.open("w") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, stderr = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            timed_out = True
    stopped = time.time()
    events = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not timed_out and proc.returncode != 0:
        raise RuntimeError(f"worker {command} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return events, timed_out, stopped


def shape_medians(groups: list[dict], shapes: Sequence[GroupShape]) -> dict[str, float]:
    """Median total seconds per group shape, over the passes that reached it."""
    medians = {}
    for i, shape in enumerate(shapes):
        times = [g["total_s"] for g in groups if g["group"] == i]
        if times:
            medians[shape.name] = round(statistics.median(times), 5)
    return medians


def measure(args: argparse.Namespace, inputs: Path, work: Path, cond: Condition) -> dict:
    """One condition: its worker (with the competitor when asked) and what it reported."""
    log.info("Condition %s (threads %s)", cond.name, cond.threads)
    competitor = None
    if cond.competitor:
        competitor = start_competitor(args.condition_timeout + COMPETITOR_MARGIN_S)
    try:
        command = worker_command(args, inputs, cond.threads)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if cond.passive else None
        events, timed_out, stopped = run_worker(
            command, args.condition_timeout, work / f"{cond.name}.jsonl", env
        )
    finally:
        competitor_cpu = stop_competitor(competitor) if competitor else None
    return summarize_condition(args, cond, events, timed_out, stopped, competitor_cpu)


def summarize_condition(
    args: argparse.Namespace,
    cond: Condition,
    events: list[dict],
    timed_out: bool,
    stopped: float,
    competitor_cpu: float | None,
) -> dict[str, Any]:
    groups = [e for e in events if e["event"] == "group"]
    threads = next((e for e in events if e["event"] == "threads"), None)
    start = next((e["time"] for e in events if e["event"] == "start"), None)
    done = next((e["time"] for e in events if e["event"] == "done"), None)
    medians = shape_medians(groups, args.groups)
    complete = len(medians) == len(args.groups)
    timed_s = (done or stopped) - start if start is not None else None
    if threads is not None:
        threads = {k: v for k, v in threads.items() if k != "event"}
    return {
        **asdict(cond),
        "name": cond.name,
        "status": "timed_out" if timed_out else "completed",
        "pool": threads,
        "groups_done": len(groups),
        "groups_planned": args.repeats * len(args.groups),
        "timed_s": round(timed_s, 4) if timed_s is not None else None,
        "group_timings": [{k: v for k, v in g.items() if k != "event"} for g in groups],
        "median_by_shape_s": medians,
        # One pass = one of each group: the sum of the per-shape medians.
        "pass_s": round(sum(medians.values()), 5) if complete else None,
        # A stopped worker that never finished a pass: one pass takes at least this long.
        "pass_s_at_least": round(timed_s, 4) if not complete and timed_s is not None else None,
        "competitor_cpu_s": competitor_cpu,
    }


def significant(value: float) -> float:
    """Four significant digits: ratios span 0.01x to 1000x."""
    return float(f"{value:.4g}")


def ratio(num: dict, den: dict) -> dict[str, float | None]:
    """num / den of two conditions' pass times; a lower bound when num was stopped early."""
    if den.get("pass_s") in (None, 0):
        return {"ratio": None, "at_least": None}
    if num.get("pass_s") is not None:
        return {"ratio": significant(num["pass_s"] / den["pass_s"]), "at_least": None}
    bound = num.get("pass_s_at_least")
    return {"ratio": None, "at_least": significant(bound / den["pass_s"]) if bound else None}


def comparisons(results: list[dict]) -> dict[str, dict]:
    by = {r["name"]: r for r in results}
    out: dict[str, dict] = {}
    for label in {r["label"] for r in results}:
        if label in by and f"{label}+competitor" in by:
            out[f"{label}: competitor / idle"] = ratio(by[f"{label}+competitor"], by[label])
    for suffix in ("", "+competitor"):
        for label in ("before", "one_free", "passive", "unaided"):
            if f"{label}{suffix}" in by:
                out[f"{label}{suffix} / after{suffix}"] = ratio(
                    by[f"{label}{suffix}"], by[f"after{suffix}"]
                )
    return dict(sorted(out.items()))


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os_cpu_count": os.cpu_count(),
        "allowed_cpus": asdict(detect_allowed_cpus()),
        "unaided_pools": pool_state(),
        "parallel_info": torch.__config__.parallel_info().strip().splitlines(),
        "git": git_state(),
    }


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"{'condition':<22}{'threads':>8}{'status':>11}{'groups':>8}{'pass s':>10}"
        f"{'competitor cpu s':>18}"
    ]
    for r in summary["conditions"]:
        count = r["pool"]["torch_intra_op"] if r["pool"] else "-"
        pass_s = r["pass_s"]
        shown = f"{pass_s:.3f}" if pass_s is not None else f">{r['pass_s_at_least'] or 0:.1f}"
        cpu = r["competitor_cpu_s"]
        lines.append(
            f"{r['name']:<22}{count:>8}{r['status']:>11}"
            f"{r['groups_done']:>4}/{r['groups_planned']:<3}{shown:>10}"
            f"{'-' if cpu is None else f'{cpu:.1f}':>18}"
        )
    lines.append("")
    for name, c in summary["comparison"].items():
        value = f"{c['ratio']:.3g}x" if c["ratio"] is not None else None
        if value is None:
            value = f">= {c['at_least']:.3g}x" if c["at_least"] is not None else "-"
        lines.append(f"{name:<36}{value:>12}")
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    started = time.perf_counter()
    counts = thread_counts(args.oversubscribe, args.labels)
    log.info("Thread counts: %s", counts)
    summary: dict[str, Any] = {
        "command": f"python scripts/bench_threads.py {shlex.join(argv)}".strip(),
        "settings": {
            "groups": [g.name for g in args.groups],
            "repeats": args.repeats,
            "ratio": args.ratio,
            "oversubscribe": args.oversubscribe,
            "condition_timeout_s": args.condition_timeout,
            "seed": args.seed,
            "labels": list(args.labels),
        },
        "emulates": (
            f"before = {args.oversubscribe} x after threads: a quota-limited host whose "
            "os.cpu_count() exceeds its CPU quota, where torch sizes its pools from the cores; "
            "the competitor is one single-threaded busy loop on the same CPUs"
        ),
        "counts": counts,
        "machine": machine(),
        "loadavg_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        work = Path(tmp)
        make_inputs(args.groups, args.seed, work / "inputs.safetensors")
        results = [
            measure(args, work / "inputs.safetensors", work, cond) for cond in conditions(counts)
        ]
    summary["conditions"] = results
    summary["comparison"] = comparisons(results)
    summary["loadavg_end"] = list(os.getloadavg())
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = benchmark(args, argv)
    print(report(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("Wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
