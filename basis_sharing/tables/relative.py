"""Each method's perplexity relative to SVD-LLM at the same ratio, from a filled table.

On a log axis the whitened methods (SVD-LLM, Basis Sharing, their update variants) lie on top
of each other; dividing by SVD-LLM's perplexity in the same column at the same ratio makes the
differences that matter (a few percent to a factor of two) visible. Only the cells the table
itself shows are used: a ratio where SVD-LLM's cell is empty has no point, and a reproduced
point is left out when its cell and SVD-LLM's come from different protocols (one evaluated on
part of the protocol, the other not), so that nothing is compared across settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from basis_sharing.tables.build import Cell, TableResult
from basis_sharing.tables.specs import METHOD_LABELS, pct

REFERENCE_METHOD = "svd_llm"
REFERENCE_LABEL = METHOD_LABELS[REFERENCE_METHOD]

Points = tuple[tuple[float, float], ...]  # (ratio, ppl / ppl(SVD-LLM)), ascending ratio


@dataclass(frozen=True)
class RelativePanel:
    """One perplexity column: every other method's series relative to SVD-LLM's cells."""

    title: str
    series: dict[tuple[str, bool], Points]  # (row label, reported?) -> points
    mismatched: tuple[str, ...] = ()  # reproduced points left out: protocols differ


def is_reference(cell: Cell) -> bool:
    """SVD-LLM as the paper runs it (no update step): the row every other one is divided by."""
    runs = cell.row.runs
    return runs.get("method") == REFERENCE_METHOD and runs.get("update", "none") == "none"


def _value(cell: Cell, reported: bool) -> float | None:
    if not reported:
        return cell.reproduced
    return cell.reported.value if cell.reported is not None else None


def _references(cells: list[Cell]) -> dict[float, Cell]:
    refs: dict[float, Cell] = {}
    for cell in cells:
        if is_reference(cell):
            if cell.ratio in refs:
                raise ValueError(
                    f"Two {REFERENCE_LABEL} rows at {pct(cell.ratio)} in column "
                    f"{cell.column.label!r}; a table spec must have one."
                )
            refs[cell.ratio] = cell
    return refs


def _panel(title: str, cells: list[Cell]) -> RelativePanel | None:
    refs = _references(cells)
    if not refs:
        return None
    series: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    mismatched = []
    for reported in (False, True):
        for cell in cells:
            ref = refs.get(cell.ratio)
            if ref is None or is_reference(cell):
                continue
            value, base = _value(cell, reported), _value(ref, reported)
            if value is None or base is None:
                continue
            if not reported and cell.truncated != ref.truncated:
                mismatched.append(f"{cell.row.label} {pct(cell.ratio)}")
                continue
            series.setdefault((cell.row.label, reported), []).append((cell.ratio, value / base))
    return RelativePanel(
        title,
        {key: tuple(sorted(points)) for key, points in series.items()},
        tuple(mismatched),
    )


def relative_to_svd_llm(result: TableResult) -> list[RelativePanel]:
    """Per perplexity column of a ratio-per-row table, ppl(method) / ppl(SVD-LLM) per ratio.

    Empty when the table has no SVD-LLM row (Tables 2 and 6-8) or its ratios are columns.
    The SVD-LLM row itself is not a series: it is 1 wherever it exists.
    """
    spec = result.spec
    panels = []
    for index, column in enumerate(spec.columns):
        if column.kind != "ppl" or column.ratio is not None:
            continue
        cells = [row[index] for row in result.cells if row[index].row.ratio is not None]
        panel = _panel(column.panel or column.label, cells)
        if panel is not None:
            panels.append(panel)
    return panels
