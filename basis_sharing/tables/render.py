"""A filled table as Markdown, CSV (long: one line per cell) and LaTeX.

Each cell shows the reproduced value next to the reported one and their difference,
``reproduced / reported (difference)``, the reported value exactly as printed in the paper. A value
that does not exist is an em dash, never a substitute; a reproduced value from part of the protocol
(``eval.max_windows`` or a zero-shot ``limit``) carries a dagger: it is not comparable.
"""

from __future__ import annotations

import csv
import io

from basis_sharing.tables.build import Cell, TableResult
from basis_sharing.tables.formatting import format_value
from basis_sharing.tables.specs import pct

MISSING = "—"
DAGGER = "†"


def legend(result: TableResult) -> str:
    """What the cell notation means, for the notation this table uses."""
    parts = []
    if result.spec.paper is not None:
        parts.append("Each cell: reproduced / reported (reproduced − reported), as printed.")
        parts.append(f"{MISSING}: no completed run, or nothing reported.")
    else:
        parts.append(f"{MISSING}: no completed run.")
    if any(c.truncated for c in result.flat()):
        parts.append(
            f"{DAGGER}: evaluated on part of the protocol (eval.max_windows or a zero-shot "
            "limit), not comparable with full-protocol numbers."
        )
    return " ".join(parts)


CSV_FIELDS = [
    "table",
    "group",
    "row",
    "column",
    "ratio",
    "metric",
    "reproduced",
    "reported",
    "reported_unit",
    "reported_note",
    "difference",
    "relative_difference",
    "truncated",
    "achieved_ratio",
    "n_runs",
    "run",
]


def reported_text(cell: Cell) -> str:
    rep = cell.reported
    if rep is None:
        return MISSING
    if rep.value is None:  # the paper prints a note (OOM) instead of a number
        return rep.note.split(":")[0] if rep.note else MISSING
    text = rep.text
    return f"{text} {rep.unit}" if rep.unit and rep.unit != cell.column.unit else text


def cell_text(cell: Cell, with_reported: bool) -> str:
    ours = MISSING
    if cell.reproduced is not None:
        ours = format_value(cell.reproduced, cell.column.kind)
        ours += DAGGER if cell.truncated else ""
    if not with_reported or cell.row.paper is None:
        return ours
    text = f"{ours} / {reported_text(cell)}"
    diff = cell.difference
    if diff is not None:
        text += f" ({format_value(diff, cell.column.kind, signed=True)})"
    return text


def header(result: TableResult) -> list[str]:
    spec = result.spec
    lead = [spec.group_label] if spec.group_label else []
    return [*lead, spec.row_label, *(c.label for c in spec.columns)]


def body(result: TableResult) -> list[list[str]]:
    spec = result.spec
    with_reported = spec.paper is not None
    rows = []
    for cells in result.cells:
        row = cells[0].row
        lead = [row.group] if spec.group_label else []
        rows.append([*lead, row.label, *(cell_text(c, with_reported) for c in cells)])
    return rows


def _cells_label(cell: Cell) -> str:
    row = cell.row
    parts = [pct(row.ratio) if row.ratio is not None else "", row.label, cell.column.label]
    return " ".join(p for p in parts if p)


def notes(result: TableResult) -> list[str]:
    """Footnotes: the spec's notes, reported values no cell faces, and the runs used."""
    spec = result.spec
    lines = list(spec.notes)
    if result.orderings:
        lines.append("Ranking by " + spec.ordering.column + " perplexity (lower first):")
        lines += [f"  {line}" for line in result.orderings]
    by_note: dict[str, list[str]] = {}
    for cell in result.flat():
        # A note printed in place of a number (OOM) is already in the cell.
        if cell.reported is not None and cell.reported.note and cell.reported.value is not None:
            by_note.setdefault(cell.reported.note, []).append(_cells_label(cell))
    for note, where in by_note.items():
        if len(where) <= 3:
            lines.append(f"Paper, {', '.join(where)}: {note}.")
    if not result.unplaced.empty:
        lines.append("Reported values whose row is unknown (not placed in the table):")
        for line in result.unplaced.itertuples():
            calibration = f", S from {line.calibration}" if line.calibration else ""
            lines.append(
                f"  {line.dataset_or_task} {line.metric} {line.value_text}{calibration}"
                + (f": {line.note}" if line.note else "")
            )
    sources: dict[str, list[str]] = {}
    for cell in result.flat():
        if cell.run is not None:
            row = cell.row
            key = f"{pct(row.ratio)} {row.label}" if row.ratio is not None else row.label
            label = cell.run + (f" (latest of {cell.n_runs})" if cell.n_runs > 1 else "")
            if label not in sources.setdefault(key, []):
                sources[key].append(label)
    if sources:
        lines.append("Runs (results store paths):")
        lines += [f"  {key}: {'; '.join(paths)}" for key, paths in sources.items()]
    else:
        lines.append(f"No completed runs in the store yet: `{spec.command}`, then collect them.")
    return lines


def to_markdown(result: TableResult) -> str:
    spec = result.spec
    head, rows = header(result), body(result)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [f"## {spec.title}", "", legend(result), ""]
    out += [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    out += ["", f"Produced by `{spec.command}`; regenerate with `make {spec.name}`.", ""]
    for note in notes(result):
        out.append(f"  - {note[2:]}" if note.startswith("  ") else f"- {note}")
    return "\n".join(out) + "\n"


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def to_csv(result: TableResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for cell in result.flat():
        rep = cell.reported
        diff = cell.difference
        relative = None
        if diff is not None and rep.value:
            relative = diff / rep.value
        writer.writerow(
            {
                "table": result.spec.name,
                "group": cell.row.group,
                "row": cell.row.label,
                "column": cell.column.label,
                "ratio": _number(cell.ratio),
                "metric": cell.column.metric,
                "reproduced": _number(cell.reproduced),
                "reported": _number(rep.value if rep else None),
                "reported_unit": rep.unit if rep else "",
                "reported_note": rep.note if rep else "",
                "difference": _number(diff),
                "relative_difference": _number(relative),
                "truncated": cell.truncated if cell.reproduced is not None else "",
                "achieved_ratio": _number(cell.achieved_ratio),
                "n_runs": cell.n_runs,
                "run": cell.run or "",
            }
        )
    return buffer.getvalue()


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    MISSING: "---",
    DAGGER: r"$^\dagger$",
    "−": "-",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(result: TableResult) -> str:
    """A booktabs ``table`` (needs ``\\usepackage{booktabs}``), one rule between ratio blocks."""
    spec = result.spec
    head, rows = header(result), body(result)
    n_lead = len(head) - len(spec.columns)
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(spec.title)}}}",
        rf"\label{{tab:{spec.name}}}",
        r"\begin{tabular}{" + "l" * n_lead + "r" * len(spec.columns) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in head) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(rows):
        if i > 0 and spec.group_label and row[0]:
            out.append(r"\midrule")
        out.append(" & ".join(latex_escape(c) for c in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"
