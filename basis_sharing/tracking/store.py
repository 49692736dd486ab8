"""The results store: finished run records collected under ``results/runs/`` and read as a table.

Hydra writes each job's ``results.json`` into a dated output directory that is not committed. The
store is the committed, stable copy that tables and plots are built from
(docs/architecture.md §5.6), so they regenerate offline and in CI:

    results/runs/<model>/<name>/<job>/results.json     (a sweep, <job> = Hydra's job directory)
    results/runs/<model>/<name>/results.json           (a single run collected under a name)

``collect`` copies completed records into that layout; ``load_runs`` flattens every record into
one DataFrame row with the fields tables select and compare on.
"""

from __future__ import annotations

import filecmp
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from basis_sharing.errors import ConfigError
from basis_sharing.methods.options import update_mode
from basis_sharing.tracking import schema
from basis_sharing.tracking.record import RESULTS_FILE
from basis_sharing.tracking.resume import config_fingerprint, read_record
from basis_sharing.tracking.schema import ACC_COLUMN_PREFIX, PPL_COLUMN_PREFIX, Key, section

log = logging.getLogger(__name__)

STORE_ROOT = Path("results") / "runs"

# Always present, in this order; per-dataset and per-task columns follow, sorted.
BASE_COLUMNS = [
    "model",
    "method",
    "target_ratio",
    "achieved_ratio",
    "group_size",
    "update",
    "whitening",
    "allocation",
    "sharing",
    "refit_basis",
    "refit_samples",
    "decomposition",
    "kinds",
    "sparsity",
    "u_update",
    "ratio_of",
    "budget_ratio",
    "calibration",
    "calibration_split",
    "finetune",
    "status",
    "collection",
    "job",
    "path",
    "fingerprint",
    "finished_at",
    "params.total",
    "time.compress_s",
    "acc.mean",
    "acc.limit",
    "speedup.forward",
]

# Stages whose wall time is the cost of compressing (Table 5's "compression time").
COMPRESS_STAGES = ("calibrate", "compress")


@dataclass
class CollectReport:
    """What ``collect`` did, for the CLI's summary and for tests."""

    copied: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    conflicts: list[Path] = field(default_factory=list)  # destination differs; not overwritten
    not_completed: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def _job_name(run_dir: Path, src: Path) -> str:
    """A job's name: its directory relative to the collected folder ("/" flattened to "_")."""
    rel = run_dir.relative_to(src)
    return "_".join(rel.parts) if rel.parts else src.resolve().name


def _model_name(record: dict[str, Any]) -> str:
    name = section(record, Key.MODEL).get("name")
    if name is None:
        name = (section(record, Key.CONFIG).get("model") or {}).get("name")
    return str(name or "unknown_model")


def collect(
    src: str | Path,
    name: str | None = None,
    dest_root: str | Path = STORE_ROOT,
    *,
    overwrite: bool = False,
) -> CollectReport:
    """Copy the completed ``results.json`` files under ``src`` into the store.

    ``src`` is a Hydra sweep directory (``outputs/multiruns/<date>/<time>``, an experiment's
    ``outputs/experiments/<table>``), a single run directory, or any folder above them. ``name``
    (default: the folder's name) groups the records under ``<dest_root>/<model>/<name>/``.
    Records that are still running or failed are left out. A destination that already exists with
    different content is a conflict and is kept unless ``overwrite``, so collecting twice is
    harmless and a newer re-run replaces an old record only when asked.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory of Hydra run outputs.")
    name = name or src.resolve().name
    report = CollectReport()
    paths = sorted(src.rglob(RESULTS_FILE))
    for path in tqdm(paths, desc="collect runs", unit="run", leave=False):
        record = read_record(path)
        if record is None:
            report.unreadable.append(path)
            continue
        if not schema.is_completed(record):
            report.not_completed.append(path)
            continue
        job = _job_name(path.parent, src)
        base = Path(dest_root) / _model_name(record) / name
        dest = base / RESULTS_FILE if path.parent == src else base / job / RESULTS_FILE
        if dest.exists():
            if filecmp.cmp(path, dest, shallow=False):
                report.unchanged.append(dest)
                continue
            if not overwrite:
                report.conflicts.append(dest)
                log.warning("%s exists with different content; kept (use overwrite).", dest)
                continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        report.copied.append(dest)
    return report


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _update(method: str | None, method_cfg: dict[str, Any]) -> str:
    try:
        return update_mode(method or "", method_cfg.get("update", False))
    except ConfigError:
        return str(method_cfg.get("update"))


def _allocation(method_cfg: dict[str, Any]) -> str | None:
    """``uniform``, or ``global`` with its scope and normalisation (``global/kind/normalized``)."""
    mode = method_cfg.get("allocation")
    if mode != "global":
        return mode
    scope = method_cfg.get("allocation_scope", "kind")
    return f"global/{scope}" + ("/normalized" if method_cfg.get("allocation_normalize") else "")


def _sharing(method_cfg: dict[str, Any]) -> str:
    """default, auto, or auto/rule (``shared=auto auto_candidates=rule``, docs/methods.md §10.3)."""
    if method_cfg.get("shared") != "auto":
        return "default"
    candidates = method_cfg.get("auto_candidates", "all")
    return "auto" if candidates == "all" else f"auto/{candidates}"


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """The store's view of one record: one flat dict of scalars."""
    config = section(record, Key.CONFIG)
    method_cfg = config.get("method") or {}
    method_info = section(record, Key.METHOD_INFO)
    stages = section(record, Key.STAGES)
    target = record.get(Key.TARGET_RATIO)
    group_size = method_cfg.get("group_size", method_info.get("group_size"))
    row: dict[str, Any] = {
        "model": _model_name(record),
        "method": record.get(Key.METHOD) or method_cfg.get("name"),
        "target_ratio": None if target is None else float(target),
        "achieved_ratio": _get(record, Key.PARAMS, "achieved_ratio"),
        "group_size": None if group_size is None else int(group_size),
        # The refit by name (methods.options.UPDATES): records with update: true/false read as
        # the method's own update / none.
        "update": _update(record.get(Key.METHOD) or method_cfg.get("name"), method_cfg),
        "whitening": method_cfg.get("whitening", "cholesky" if "eps" in method_cfg else None),
        "allocation": _allocation(method_cfg),
        "sharing": _sharing(method_cfg),
        # update=sequential's options (docs/methods.md §10.1); records before them: False / None.
        "refit_basis": bool(method_cfg.get("refit_basis", False)),
        "refit_samples": method_cfg.get("refit_samples"),
        "decomposition": method_cfg.get("decomposition", "svd" if "eps" in method_cfg else None),
        # Methods compressing some kinds only (method.kinds, FiPS): which, and the ratio over them.
        "kinds": "/".join(kinds) if (kinds := method_cfg.get("kinds")) else "all",
        "sparsity": method_cfg.get("sparsity"),
        "u_update": method_cfg.get("u_update"),
        "ratio_of": method_cfg.get("ratio_of"),
        "budget_ratio": _get(record, Key.PARAMS, "budget", "achieved_ratio"),
        "calibration": _get(config, "calibration", "dataset"),
        "calibration_split": _get(config, "calibration", "split"),
        "finetune": _get(config, "finetune", "name") or "none",
        "status": record.get(Key.STATUS),
        "finished_at": record.get(Key.FINISHED_AT),
        "fingerprint": config_fingerprint(config),
        "params.total": _get(record, Key.PARAMS, "total"),
    }
    compress_s = [stages[s]["wall_s"] for s in COMPRESS_STAGES if "wall_s" in stages.get(s, {})]
    row["time.compress_s"] = sum(compress_s) if compress_s else None
    for dataset, result in schema.perplexity(record).items():
        column = f"{PPL_COLUMN_PREFIX}{dataset}"
        row[column] = result.get("ppl")
        row[f"{column}.truncated"] = result.get("truncated")
        row[f"{column}.windows"] = result.get("n_windows_evaluated")
    zeroshot = schema.zeroshot(record)
    for task, result in (zeroshot.get("tasks") or {}).items():
        row[f"{ACC_COLUMN_PREFIX}{task}"] = result.get("acc")
    row["acc.mean"] = zeroshot.get("mean_acc")
    row["acc.limit"] = zeroshot.get("limit")
    row["speedup.forward"] = _get(schema.throughput(record), "speedup", "forward")
    return row


def load_runs(root: str | Path = STORE_ROOT) -> pd.DataFrame:
    """Every ``results.json`` under ``root`` as one row (all statuses; filter on ``status``).

    ``collection`` and ``job`` come from the store layout (``<model>/<collection>/<job>/``);
    ``path`` is the file relative to ``root``. Unreadable files are skipped with a warning.
    """
    root = Path(root)
    rows = []
    paths = sorted(root.rglob(RESULTS_FILE)) if root.is_dir() else []
    for path in tqdm(paths, desc="load runs", unit="run", leave=False):
        record = read_record(path)
        if record is None:
            log.warning("Skipping unreadable run record %s", path)
            continue
        rel = path.relative_to(root)
        row = record_row(record)
        row["collection"] = rel.parts[1] if len(rel.parts) >= 3 else None
        row["job"] = "/".join(rel.parts[2:-1]) or None
        row["path"] = rel.as_posix()
        rows.append(row)
    extra = sorted({k for row in rows for k in row} - set(BASE_COLUMNS))
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS + extra)
    # Counts stay integers where some runs lack them (pandas would turn them into floats).
    for column in ["group_size", "params.total", *(c for c in extra if c.endswith(".windows"))]:
        frame[column] = frame[column].astype("Int64")
    return frame.sort_values("path", kind="stable").reset_index(drop=True)
