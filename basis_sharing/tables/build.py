"""Fill a table spec from the results store and the paper's numbers.

Nothing is estimated or carried over: a cell without a completed run stays empty, and so does
a reported value the paper does not give. When several runs match one cell (a re-run, or a
setting the spec does not pin down), the most recently finished one is used and the count is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from basis_sharing.tables.formatting import format_value
from basis_sharing.tables.specs import METHOD_LABELS, Column, Row, TableSpec, pct
from basis_sharing.tracking.schema import ACC_COLUMN_PREFIX, PPL_COLUMN_PREFIX, Key, Status

TOLERANCE = 1e-9


@dataclass
class Reported:
    """One number from the paper (``value`` None when it prints a note instead, e.g. OOM)."""

    value: float | None
    text: str  # as printed in the paper
    unit: str
    note: str


@dataclass
class Cell:
    row: Row
    column: Column
    reproduced: float | None = None
    reported: Reported | None = None
    run: str | None = None  # store path of the run used
    n_runs: int = 0  # completed runs matching the cell
    truncated: bool = False  # evaluated on part of the protocol (not comparable)
    achieved_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.row.ratio if self.row.ratio is not None else self.column.ratio

    @property
    def difference(self) -> float | None:
        """Reproduced minus reported, when both exist in the same unit."""
        rep = self.reported
        if self.reproduced is None or rep is None or rep.value is None:
            return None
        if rep.unit and rep.unit != self.column.unit:
            return None
        return self.reproduced - rep.value


@dataclass
class TableResult:
    spec: TableSpec
    cells: list[list[Cell]]  # [row][column]
    unplaced: pd.DataFrame  # reported lines of this table that no cell faces
    orderings: list[str] = field(default_factory=list)

    def flat(self) -> list[Cell]:
        return [cell for row in self.cells for cell in row]


def matching(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.Series:
    """Rows of ``frame`` whose columns equal ``filters`` (None: missing; floats: tolerance)."""
    mask = pd.Series(True, index=frame.index)
    for key, value in filters.items():
        if key not in frame.columns:  # e.g. no run has this metric: only "missing" matches
            mask &= value is None
            continue
        column = frame[key]
        if value is None:
            mask &= column.isna()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numeric = pd.to_numeric(column, errors="coerce").astype(float)
            mask &= (numeric - float(value)).abs().lt(TOLERANCE).fillna(False)
        else:
            mask &= column.eq(value).fillna(False)
    return mask.astype(bool)


def _scalar(value: Any) -> float | None:
    if value is None or value is pd.NA:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _truncated(run: pd.Series, metric: str) -> bool:
    """Whether the metric comes from part of the protocol (max_windows, a zero-shot limit)."""
    if metric.startswith(PPL_COLUMN_PREFIX):
        flag = run.get(f"{metric}.truncated")
        return flag is not None and flag is not pd.NA and bool(flag)
    if metric.startswith(ACC_COLUMN_PREFIX):
        return _scalar(run.get("acc.limit")) is not None
    return False


def fill_reproduced(cell: Cell, runs: pd.DataFrame, filters: Mapping[str, Any]) -> None:
    candidates = runs[matching(runs, filters)]
    metric = cell.column.metric
    if metric in candidates.columns:
        candidates = candidates[candidates[metric].notna()]
    else:
        candidates = candidates.iloc[0:0]
    cell.n_runs = len(candidates)
    if candidates.empty:
        return
    latest = candidates.sort_values([Key.FINISHED_AT, "path"], na_position="first").iloc[-1]
    cell.reproduced = _scalar(latest[metric]) * cell.column.scale
    cell.run = latest["path"]
    cell.truncated = _truncated(latest, metric)
    cell.achieved_ratio = _scalar(latest.get("achieved_ratio"))


def fill_reported(cell: Cell, paper: pd.DataFrame, filters: Mapping[str, Any]) -> int | None:
    lines = paper[matching(paper, filters)]
    if len(lines) > 1:
        raise ValueError(
            f"{len(lines)} reported lines match {dict(filters)}; a table spec must pick one."
        )
    if lines.empty:
        return None
    line = lines.iloc[0]
    cell.reported = Reported(_scalar(line["value"]), line["value_text"], line["unit"], line["note"])
    return lines.index[0]


def build_table(spec: TableSpec, runs: pd.DataFrame, paper: pd.DataFrame | None) -> TableResult:
    """Every cell of ``spec`` from the store rows ``runs`` and the paper lines ``paper``."""
    completed = runs[runs[Key.STATUS] == Status.COMPLETED] if Key.STATUS in runs else runs
    used: set[int] = set()
    cells = []
    for row in spec.rows:
        line = []
        for column in spec.columns:
            cell = Cell(row, column)
            fill_reproduced(cell, completed, {**spec.runs, **row.runs, **column.runs})
            if paper is not None and spec.paper is not None and row.paper is not None:
                index = fill_reported(cell, paper, {**spec.paper, **row.paper, **column.paper})
                if index is not None:
                    used.add(index)
            line.append(cell)
        cells.append(line)
    if paper is not None and spec.paper is not None:
        mine = paper[matching(paper, spec.paper)]
        unplaced = mine.loc[[i for i in mine.index if i not in used]]
    else:
        unplaced = pd.DataFrame()
    result = TableResult(spec, cells, unplaced)
    if spec.ordering is not None and paper is not None:
        result.orderings = orderings(result, paper)
    return result


def _ranked(pairs: list[tuple[float, str]]) -> str:
    return " < ".join(text for _, text in sorted(pairs))


def orderings(result: TableResult, paper: pd.DataFrame) -> list[str]:
    """Per ratio, this table's rows ranked by the ordering column, next to the reference's."""
    spec = result.spec
    order = spec.ordering
    index = [c.label for c in spec.columns].index(order.column)
    kind = spec.columns[index].kind
    reference = paper[matching(paper, order.paper)]
    lines = []
    ratios = sorted({r.ratio for r in spec.rows if r.ratio is not None})
    for ratio in ratios:
        ours = [
            (cells[index].reproduced, cells[index].row.label)
            for cells in result.cells
            if cells[index].row.ratio == ratio and cells[index].reproduced is not None
        ]
        theirs = [
            (line.value, f"{METHOD_LABELS.get(line.method, line.method)} {line.value_text}")
            for line in reference[matching(reference, {"ratio": ratio})].itertuples()
            if not math.isnan(line.value)
        ]
        here = [(v, f"{label} {format_value(v, kind)}") for v, label in ours]
        lines.append(
            f"{pct(ratio)}: here {_ranked(here) or '—'}; {order.label}: {_ranked(theirs) or '—'}"
        )
    return lines
