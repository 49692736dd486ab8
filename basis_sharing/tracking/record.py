"""The run record: ``results.json`` in the run's output directory.

It is written when the run starts (status "running"), after every stage, and at the end
("completed" or "failed" with the error), atomically each time, so an interrupted or failed run
still leaves everything it computed. Tables and plots are built only from these files. The
layout (section names, their types, what each status implies) is ``tracking.schema``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from basis_sharing.tracking import schema
from basis_sharing.tracking.environment import environment
from basis_sharing.tracking.resources import measure
from basis_sharing.tracking.schema import SCHEMA_VERSION, Key, Status, section

RESULTS_FILE = "results.json"
# A rerun (force=true, or another configuration in the same job directory) writes here until it
# completes, so a completed results.json is never lost to a run that then fails; the record it
# replaces is kept as PREVIOUS_FILE.
PENDING_FILE = "results.pending.json"
PREVIOUS_FILE = "results.previous.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunRecord:
    """Accumulates a run's record and keeps ``<out_dir>/results.json`` up to date.

    ``persist=False``: the record only lives in memory and no file is ever written (a
    data-parallel rank other than 0: rank 0 writes the run's record).
    """

    def __init__(
        self, out_dir: str | Path, config: dict[str, Any], *, persist: bool = True, **fields: Any
    ) -> None:
        self.out_dir = Path(out_dir)
        self.persist = persist
        self.final_path = self.out_dir / RESULTS_FILE
        self.path = self.out_dir / PENDING_FILE if _completed(self.final_path) else self.final_path
        # Called with the record's data after every write (experiment trackers mirror results as
        # they are produced, without the pipeline knowing about them).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.data: dict[str, Any] = {
            Key.SCHEMA_VERSION: SCHEMA_VERSION,
            Key.STATUS: Status.RUNNING,
            Key.STARTED_AT: _now(),
            Key.FINISHED_AT: None,
            Key.RUN_DIR: str(self.out_dir.resolve()),
            **fields,
            Key.CONFIG: config,
            Key.MODEL: {},
            Key.DATA: {},
            Key.HASHES: {"eval": {}, "calibration": None},
            Key.PARAMS: {},
            Key.METRICS: {},
            Key.STAGES: {},
            Key.ENVIRONMENT: environment(),
            Key.ERROR: None,
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    @contextmanager
    def stage(self, name: str, device=None) -> Iterator[dict]:
        """Time a pipeline stage and record its wall time and peak memory."""
        stats: dict[str, Any] = {}
        self.data[Key.STAGES][name] = stats
        with measure(stats, device):
            yield stats
        self.write()

    def metric(self, name: str) -> dict[str, Any]:
        """``metrics.<name>`` to fill (created empty on first use), e.g. ``Metric.PERPLEXITY``."""
        return self.data[Key.METRICS].setdefault(name, {})

    def finish(self) -> Path:
        self.data[Key.STATUS] = Status.COMPLETED
        self.data[Key.FINISHED_AT] = _now()
        self.write()
        if self.persist and self.path != self.final_path:  # only now may the earlier record go
            if self.final_path.exists():
                os.replace(self.final_path, self.out_dir / PREVIOUS_FILE)
            os.replace(self.path, self.final_path)
            self.path = self.final_path
        return self.path

    def fail(self, exc: BaseException) -> Path:
        self.data[Key.STATUS] = Status.FAILED
        self.data[Key.FINISHED_AT] = _now()
        self.data[Key.ERROR] = schema.error_info(exc)
        return self.write()

    def write(self) -> Path:
        if not self.persist:
            return self.path
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{RESULTS_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
        for listener in list(self.listeners):
            listener(self.data)
        return self.path


def _completed(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get(Key.STATUS) == Status.COMPLETED
    except (OSError, ValueError, AttributeError):
        return False


def load_record(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _fmt_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def _zeroshot_lines(zeroshot: dict[str, Any] | None) -> list[str]:
    if not zeroshot:
        return []
    limit = zeroshot.get("limit")
    lines = [f"{'zero-shot':<15}{'acc':>7}{'acc_norm':>10}{'docs':>12}  (limit {limit})"]
    for name, r in zeroshot["tasks"].items():
        norm = r.get("acc_norm")
        docs = f"{r.get('n_samples')}/{r.get('n_docs')}"
        lines.append(
            f"{name:<15}{r['acc']:>7.4f}{'-' if norm is None else f'{norm:.4f}':>10}{docs:>12}"
        )
    if zeroshot.get("mean_acc") is not None:
        lines.append(f"{'mean':<15}{zeroshot['mean_acc']:>7.4f}")
    return lines


def _throughput_lines(throughput: dict[str, Any] | None) -> list[str]:
    if not throughput:
        return []
    lines = [f"{'throughput':<12}{'forward tok/s':>15}{'generate tok/s':>16}{'weights MB':>12}"]
    for name in ("dense", "compressed", "model"):
        r = throughput.get(name)
        if r:
            lines.append(
                f"{name:<12}{r['forward']['tokens_per_s']:>15.1f}"
                f"{r['generation']['tokens_per_s']:>16.2f}{r['weights_mb']:>12.1f}"
            )
    ratio = throughput.get("speedup")
    if ratio:
        lines.append(
            f"{'ratio':<12}{ratio['forward']:>15.3f}{ratio['generation']:>16.3f}"
            f"{ratio['weights_mb']:>12.3f}"
        )
    return lines


def _finetune_lines(finetune: dict[str, Any]) -> list[str]:
    """The fine-tuner, the splits it trained and evaluated on, and its losses."""
    if not finetune:
        return []
    data = finetune.get("data") or {}
    splits = " | ".join(
        f"{role} {d.get('dataset')} {d.get('split')}" for role, d in data.items() if d
    )
    line = f"finetune {finetune.get('name')}" + (f" | {splits}" if splits else "")
    evals = finetune.get("eval_loss") or []
    if evals:
        best = finetune.get("best_epoch")
        line += f" | eval loss {' '.join(f'{v:.4f}' for v in evals)} (kept epoch {best})"
    return [line]


def summary_table(data: dict[str, Any]) -> str:
    """A short plain-text summary of a run record (printed at the end of every run)."""
    params = section(data, Key.PARAMS)
    ratio = data.get(Key.TARGET_RATIO)
    lines = [
        f"model {section(data, Key.MODEL).get('name')} | method {data.get(Key.METHOD)} | "
        f"target ratio {'-' if ratio is None else ratio} | status {data.get(Key.STATUS)}",
    ]
    if params:
        lines.append(
            f"params: total {params['total']:,} | decoder projections "
            f"{params['decoder_projections']:,} (achieved ratio {params['achieved_ratio']:.4f})"
        )
        budget = params.get("budget")
        if budget:
            lines.append(
                f"budget: {'/'.join(budget['kinds'])} projections {budget['kept']:,} of "
                f"{budget['dense']:,} (achieved ratio {budget['achieved_ratio']:.4f})"
            )
    ppl = schema.perplexity(data)
    if ppl:
        lines.append(f"{'dataset':<11}{'ppl':>10}{'windows':>12}{'tokens':>10}  note")
        for name, r in ppl.items():
            note = "truncated (max_windows)" if r["truncated"] else "full protocol"
            windows = f"{r['n_windows_evaluated']}/{r['n_windows']}"
            lines.append(
                f"{name:<11}{_fmt_ppl(r['ppl']):>10}{windows:>12}{r['n_tokens']:>10}  {note}"
            )
    lines += _finetune_lines(section(data, Key.FINETUNE))
    lines += _zeroshot_lines(schema.zeroshot(data))
    lines += _throughput_lines(schema.throughput(data))
    for sample in data.get(Key.GENERATION_SAMPLES) or []:
        lines.append(f"sample: {sample['prompt']!r} -> {sample['completion']!r}")
    stages = section(data, Key.STAGES)
    if stages:
        width = max(14, *(len(name) + 2 for name in stages))
        lines.append(f"{'stage':<{width}}{'wall s':>9}{'peak RSS MB':>13}{'CUDA peak MB':>14}")
        for name, s in stages.items():
            cuda = s.get("cuda_peak_mb")
            lines.append(
                f"{name:<{width}}{s.get('wall_s', float('nan')):>9.2f}"
                f"{s.get('peak_rss_mb', float('nan')):>13.1f}{'-' if cuda is None else cuda:>14}"
            )
    return "\n".join(lines)
