"""Where does the time of one compression run go, and what does a ratio sweep save?

Two measurements, in one process, through ``basis_sharing.pipeline.run`` (no subprocesses):

1. **Single run** at the first ratio with a fresh statistics cache (``paths.cache_dir`` is a new
   temporary directory, so the calibration Grams are computed cold) and an empty in-process
   decomposition cache: the wall time of the whole ``pipeline.run`` call and each stage's wall
   time, peak RSS and CUDA peak, as the run record holds them.
2. **Sweep**: a second fresh statistics cache and an empty decomposition cache, then one
   ``pipeline.run`` per ratio in the same process, which is what Hydra's basic launcher does for
   ``python run.py ratio=0.2,0.3,0.4,0.5 -m``. Jobs 2..n should read the Grams from the disk
   cache (``record["calibration"]["cache_hit"]``) and reuse every ratio-independent whitened SVD
   from the sweep's ``SweepCaches`` (one object passed to every job); the report says how much
   time that saves against n single runs and which stages shrank.

Two ratios come out: ``sweep / (n x single)`` compares with n separate ``python run.py``
processes (the single run comes first, so it also pays the process's first-use costs: lazy
imports, tokenizer and model-class setup), and ``sweep / (n x sweep job 1)`` uses job 1 (cold
caches, warm process) as the baseline, which isolates the reuse of statistics and decompositions.

Converted models (``<cache_dir>/models``, the embedded SmolLM2's dequantised GGUF) are not part
of the measurement: each fresh cache directory links its ``models/`` to ``--model-cache``
(default: the configured ``paths.cache_dir``), and the model source is resolved once, untimed,
before the first run. Without this every fresh cache would convert the GGUF file again.

Reproduce (embedded SmolLM2-135M, CPU-sized calibration, no perplexity)::

    python scripts/bench_compress.py --json bench_compress.json

Tiny smoke run (a model directory and a data mirror as the tests build them)::

    python scripts/bench_compress.py --model local --override model.local_path=/tmp/tiny/model \
        --override model.context_length=64 --override ratio_tolerance=0.05 \
        --data-dir /tmp/tiny/mirror --n-samples 8 --seq-len 32

The final report goes to stdout; progress is logged to stderr. Exit code 0 on success, 1 when a
run fails with a user error (its message is logged).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# scripts/ is not a package and basis_sharing need not be installed: run from a checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import basis_sharing.config  # noqa: E402,F401  (registers the config schemas and resolvers)
import basis_sharing.methods  # noqa: E402,F401  (registers every method and its config schema)
from basis_sharing import pipeline  # noqa: E402
from basis_sharing.errors import UserError  # noqa: E402
from basis_sharing.methods.caches import SweepCaches  # noqa: E402
from basis_sharing.models.loading import resolve_source  # noqa: E402

CONF_DIR = REPO_ROOT / "conf"
# A later job's stage "shrank" when its mean wall time is at most this fraction of job 1's and
# at least MIN_SAVED_S shorter (stage times are recorded to the millisecond).
SHRINK_FRACTION = 0.8
MIN_SAVED_S = 0.005
# Keys the benchmark sets itself: overriding them would defeat the cold caches or the sweep.
RESERVED_KEYS = {"ratio": "--ratios", "paths.cache_dir": "--model-cache"}

log = logging.getLogger("bench_compress")


@dataclass
class JobResult:
    """One timed ``pipeline.run`` call and what its record says about the caches."""

    ratio: float
    total_s: float
    stages: dict[str, dict[str, Any]]
    stats_cache_hit: bool | None
    decomposition_hits: int
    decomposition_misses: int
    status: str
    outside_stages_s: float = field(init=False)

    def __post_init__(self) -> None:
        staged = sum(s.get("wall_s", 0.0) for s in self.stages.values())
        self.outside_stages_s = round(self.total_s - staged, 4)

    def stage_wall(self, name: str) -> float | None:
        return self.stages.get(name, {}).get("wall_s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one compression run and a ratio sweep that reuses cached statistics."
    )
    parser.add_argument("--model", default="smollm2_135m", help="model config group option")
    parser.add_argument("--method", default="basis_sharing", help="method config group option")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--n-samples", type=int, default=64, help="calibration.n_samples")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration.seq_len")
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        help="0: no perplexity (eval.ppl_datasets=[]); N: first N WikiText-2 windows",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="data", help="paths.data_dir (the data mirror)")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=None,
        help="where converted models are cached (default: the configured paths.cache_dir)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override, appended verbatim (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.eval_windows < 0:
        parser.error("--eval-windows must be >= 0")
    for override in args.override:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RESERVED_KEYS:
            parser.error(
                f"--override {override}: the benchmark sets {key}; use {RESERVED_KEYS[key]}"
            )
    return args


def run_overrides(
    args: argparse.Namespace, ratio: float, cache_dir: Path | None, out: Path
) -> list[str]:
    """The Hydra overrides of one job (``cache_dir`` None: the configured one)."""
    overrides = [
        f"model={args.model}",
        f"method={args.method}",
        f"ratio={ratio}",
        "calibration=wikitext2_cpu",
        f"calibration.n_samples={args.n_samples}",
        f"calibration.seq_len={args.seq_len}",
        f"paths.data_dir={args.data_dir}",
        f"paths.output_root={out}",
        f"device={args.device}",
        "eval=ppl",  # compression is what is timed: no zero-shot, throughput or samples
    ]
    if cache_dir is not None:
        overrides.append(f"paths.cache_dir={cache_dir}")
    if args.eval_windows == 0:
        overrides.append("eval.ppl_datasets=[]")
    else:
        overrides += ["eval.ppl_datasets=[wikitext2]", f"eval.max_windows={args.eval_windows}"]
    return overrides + list(args.override)


def compose_config(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def fresh_cache(root: Path, name: str, model_cache: Path) -> Path:
    """A new, empty cache directory whose ``models/`` is the shared converted-model cache."""
    cache = root / name
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(model_cache / "models", target_is_directory=True)
    return cache


def prepare_model_cache(args: argparse.Namespace, work: Path) -> Path:
    """Resolve the model source once, untimed, so no timed run converts or downloads it."""
    cfg = compose_config(run_overrides(args, args.ratios[0], None, work / "outputs"))
    model_cache = (args.model_cache or Path(cfg.paths.cache_dir)).expanduser().resolve()
    (model_cache / "models").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    resolve_source(cfg.model, model_cache, cfg.offline)
    log.info("Model source ready in %.1f s (cache %s)", time.perf_counter() - start, model_cache)
    return model_cache


def timed_run(cfg: DictConfig, out_dir: Path, caches: SweepCaches) -> JobResult:
    """One ``pipeline.run`` call, timed as a whole, with the decomposition-cache deltas."""
    decompositions = caches.decompositions
    hits, misses = decompositions.hits, decompositions.misses
    start = time.perf_counter()
    record = pipeline.run(cfg, out_dir=out_dir, caches=caches)
    total = time.perf_counter() - start
    return JobResult(
        ratio=float(cfg.ratio),
        total_s=round(total, 4),
        stages=record["stages"],
        stats_cache_hit=(record.get("calibration") or {}).get("cache_hit"),
        decomposition_hits=decompositions.hits - hits,
        decomposition_misses=decompositions.misses - misses,
        status=record["status"],
    )


def single_run(args: argparse.Namespace, work: Path, model_cache: Path) -> JobResult:
    cache = fresh_cache(work, "cache_single", model_cache)
    cfg = compose_config(run_overrides(args, args.ratios[0], cache, work / "outputs"))
    log.info("Single run: ratio %s, cold statistics cache %s", args.ratios[0], cache)
    return timed_run(cfg, work / "single", SweepCaches())  # empty: its own decompositions


def sweep(args: argparse.Namespace, work: Path, model_cache: Path) -> tuple[float, list[JobResult]]:
    """One run per ratio in this process, sharing a fresh statistics cache; (total s, jobs)."""
    cache = fresh_cache(work, "cache_sweep", model_cache)
    configs = [
        compose_config(run_overrides(args, ratio, cache, work / "outputs")) for ratio in args.ratios
    ]
    caches = SweepCaches()  # the sweep's owner, as run.py's process is for a -m sweep
    jobs: list[JobResult] = []
    start = time.perf_counter()
    for i, cfg in enumerate(configs):
        log.info("Sweep job %d/%d: ratio %s", i + 1, len(configs), cfg.ratio)
        jobs.append(timed_run(cfg, work / "sweep" / f"ratio={cfg.ratio}", caches))
    return round(time.perf_counter() - start, 4), jobs


def stage_changes(jobs: list[JobResult]) -> dict[str, dict[str, float | bool]]:
    """Per stage: job 1's wall time, the mean over jobs 2..n, and whether it shrank."""
    changes: dict[str, dict[str, float | bool]] = {}
    if len(jobs) < 2:
        return changes
    for name in jobs[0].stages:
        first = jobs[0].stage_wall(name)
        later = [w for w in (job.stage_wall(name) for job in jobs[1:]) if w is not None]
        if first is None or not later:
            continue
        mean = statistics.fmean(later)
        changes[name] = {
            "job1_s": first,
            "later_mean_s": round(mean, 4),
            "saved_s": round(first - mean, 4),
            "shrank": mean <= SHRINK_FRACTION * first and first - mean >= MIN_SAVED_S,
        }
    return changes


def summarize(args: argparse.Namespace, single: JobResult, sweep_s: float, jobs: list[JobResult]):
    n_single = len(jobs) * single.total_s
    n_job1 = len(jobs) * jobs[0].total_s
    return {
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "single": asdict(single),
        "sweep": {"total_s": sweep_s, "jobs": [asdict(job) for job in jobs]},
        "single_total_s": single.total_s,
        "sweep_total_s": sweep_s,
        "n_times_single_s": round(n_single, 4),
        "sweep_over_n_single": round(sweep_s / n_single, 4) if n_single > 0 else None,
        # Job 1 has cold caches in a warm process: this ratio is the cache reuse alone.
        "sweep_over_n_job1": round(sweep_s / n_job1, 4) if n_job1 > 0 else None,
        "stage_changes": stage_changes(jobs),
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def single_table(single: JobResult) -> list[str]:
    lines = [
        f"Single run (ratio {single.ratio}, cold statistics and decompositions)",
        f"  {'stage':<14}{'wall s':>9}{'share':>8}{'peak RSS MB':>13}{'CUDA peak MB':>14}",
    ]
    for name, s in single.stages.items():
        wall = s.get("wall_s", 0.0)
        share = wall / single.total_s if single.total_s > 0 else 0.0
        lines.append(
            f"  {name:<14}{wall:>9.2f}{share:>8.1%}{_fmt(s.get('peak_rss_mb'), '.1f'):>13}"
            f"{_fmt(s.get('cuda_peak_mb'), '.1f'):>14}"
        )
    lines.append(f"  {'(outside)':<14}{single.outside_stages_s:>9.2f}")
    lines.append(f"  {'total':<14}{single.total_s:>9.2f}")
    return lines


def sweep_table(jobs: list[JobResult]) -> list[str]:
    lines = [
        "Sweep jobs (one process, shared statistics cache and decomposition cache)",
        f"  {'job':<5}{'ratio':>7}{'total s':>10}{'calibrate s':>13}{'compress s':>12}"
        f"{'stats cache':>13}{'SVD hits':>10}{'SVD misses':>12}",
    ]
    for i, job in enumerate(jobs, 1):
        hit = {True: "hit", False: "miss", None: "-"}[job.stats_cache_hit]
        lines.append(
            f"  {i:<5}{job.ratio:>7}{job.total_s:>10.2f}{_fmt(job.stage_wall('calibrate')):>13}"
            f"{_fmt(job.stage_wall('compress')):>12}{hit:>13}{job.decomposition_hits:>10}"
            f"{job.decomposition_misses:>12}"
        )
    return lines


def changes_table(changes: dict[str, dict[str, float | bool]]) -> list[str]:
    if not changes:
        return ["Stage changes: need at least two ratios."]
    lines = [
        "Stages in jobs 2..n against job 1",
        f"  {'stage':<14}{'job 1 s':>9}{'2..n mean s':>13}{'saved s':>9}  shrank",
    ]
    for name, c in changes.items():
        lines.append(
            f"  {name:<14}{c['job1_s']:>9.2f}{c['later_mean_s']:>13.2f}{c['saved_s']:>9.2f}"
            f"  {'yes' if c['shrank'] else 'no'}"
        )
    shrank = [name for name, c in changes.items() if c["shrank"]]
    lines.append(
        f"  shrank (<= {SHRINK_FRACTION:.0%} of job 1 and >= {MIN_SAVED_S} s less): "
        f"{', '.join(shrank) if shrank else 'none'}"
    )
    return lines


def report(summary: dict[str, Any], single: JobResult, jobs: list[JobResult]) -> str:
    n = len(jobs)
    ratio = summary["sweep_over_n_single"]
    lines = [
        *single_table(single),
        "",
        *sweep_table(jobs),
        "",
        *changes_table(summary["stage_changes"]),
        "",
        f"single-run total          {summary['single_total_s']:10.2f} s",
        f"sweep total ({n} ratios)    {summary['sweep_total_s']:10.2f} s",
        f"{n} x single               {summary['n_times_single_s']:10.2f} s",
        f"sweep / ({n} x single)      {_fmt(ratio, '10.3f')}",
        f"sweep job 1               {jobs[0].total_s:10.2f} s  (cold caches, warm process; the "
        "single run also pays the process's first-use costs)",
        f"sweep / ({n} x sweep job 1) {_fmt(summary['sweep_over_n_job1'], '10.3f')}  "
        "(cache reuse alone)",
    ]
    return "\n".join(lines)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("Wrote %s", path)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_compress_") as tmp:
        work = Path(tmp)
        model_cache = prepare_model_cache(args, work)
        single = single_run(args, work, model_cache)
        sweep_s, jobs = sweep(args, work, model_cache)
    summary = summarize(args, single, sweep_s, jobs)
    print(report(summary, single, jobs))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        summary = benchmark(args)
    except UserError as exc:
        log.error("%s", exc)
        return 1
    if args.json is not None:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
