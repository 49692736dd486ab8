"""The numbers reported in the paper, read from ``results/paper/*.csv`` (one line per number)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PAPER_ROOT = Path("results") / "paper"
PAPER_COLUMNS = [
    "table",
    "model",
    "method",
    "ratio",
    "group_size",
    "finetune",
    "calibration",
    "dataset_or_task",
    "metric",
    "value",
    "unit",
    "note",
]


def load_paper(root: str | Path = PAPER_ROOT) -> pd.DataFrame:
    """Every reported number, typed: ``ratio`` and ``value`` float (NaN when the paper prints
    none, e.g. OOM), ``group_size`` nullable int, the rest strings ("" when empty), plus
    ``value_text``, the number as printed."""
    files = sorted(Path(root).glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"No paper CSV files in {root}.")
    frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files]
    frame = pd.concat(frames, ignore_index=True)
    missing = set(PAPER_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"Paper CSV files in {root} lack columns {sorted(missing)}.")
    frame = frame[PAPER_COLUMNS].copy()
    frame["value_text"] = frame["value"]  # as printed ("51", "21.3"): tables show it verbatim
    frame["ratio"] = pd.to_numeric(frame["ratio"].replace("", None), errors="raise")
    frame["value"] = pd.to_numeric(frame["value"].replace("", None), errors="raise")
    frame["group_size"] = pd.to_numeric(frame["group_size"].replace("", None)).astype("Int64")
    return frame
