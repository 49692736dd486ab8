"""Plots beside each table: perplexity (log scale) and mean accuracy against the ratio.

Reproduced values are solid lines with filled markers, reported ones dashed with hollow markers
in the same colour, the uncompressed model a dotted horizontal line. A table with a single ratio
(Tables 3-5) is drawn as grouped bars per column instead. Missing cells are simply absent.

A ratio sweep with an SVD-LLM row also gets ``<table>_rel.png``: each method's perplexity divided
by SVD-LLM's at the same ratio, on a linear axis, because on the log axis the whitened methods
overlap. Ratios beyond ``REL_LIMITS`` would squash that axis: such points are drawn as a
triangle at the panel's edge with their value, and a method beyond them at every ratio is left
out and named under the panel.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import AutoMinorLocator  # noqa: E402

from basis_sharing.tables.build import Cell, TableResult  # noqa: E402
from basis_sharing.tables.relative import (  # noqa: E402
    REFERENCE_LABEL,
    RelativePanel,
    relative_to_svd_llm,
)

DPI = 120
# Relative perplexities shown on the axis; the methods the panel is for lie well inside.
REL_LIMITS = (0.5, 2.0)
NOTE_WIDTH = 80  # characters per line of the notes under a panel


def _series(cells: list[Cell], reported: bool) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for cell in cells:
        value = cell.reproduced
        if reported:
            value = cell.reported.value if cell.reported is not None else None
        if value is not None and cell.ratio is not None:
            out[cell.row.label].append((cell.ratio, value))
    return out


def _label(label: str, reported: bool, with_paper: bool) -> str:
    if not with_paper:
        return label
    return f"{label} ({'paper' if reported else 'here'})"


def _reference(cells: list[Cell], reported: bool) -> float | None:
    """The uncompressed model's value (a row without a ratio)."""
    for cell in cells:
        if cell.ratio is None:
            rep = cell.reported
            value = (rep.value if rep else None) if reported else cell.reproduced
            if value is not None:
                return value
    return None


def _panel(ax, cells: list[Cell], title: str, log: bool, with_paper: bool) -> bool:
    labels = list(dict.fromkeys(c.row.label for c in cells if c.ratio is not None))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    drawn = False
    for reported, style, fill in ((False, "-", None), (True, "--", "none")):
        for label, points in _series(cells, reported).items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(
                [x * 100 for x in xs],
                ys,
                style,
                marker="o",
                color=colors[label],
                markerfacecolor=fill,
                label=_label(label, reported, with_paper),
            )
            drawn = True
        ref = _reference(cells, reported)
        if ref is not None:
            ax.axhline(
                ref,
                color="grey",
                linestyle=":" if not reported else "-.",
                linewidth=1,
                label=_label("Original", reported, with_paper),
            )
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("compression ratio (%)")
    if log:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return drawn


def _ratio_figure(result: TableResult, kind: str, metrics: set[str] | None, path: Path):
    panels: dict[str, list[Cell]] = defaultdict(list)
    for cell in result.flat():
        col = cell.column
        if col.kind == kind and (metrics is None or col.metric in metrics):
            panels[col.panel or col.label].append(cell)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    drawn = False
    for ax, (title, cells) in zip(axes[0], panels.items(), strict=True):
        drawn |= _panel(ax, cells, title, kind == "ppl", result.spec.paper is not None)
        ax.set_ylabel("perplexity" if kind == "ppl" else "mean zero-shot accuracy")
    if not drawn:
        plt.close(fig)
        return None
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(result.spec.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _outside(value: float) -> bool:
    low, high = REL_LIMITS
    return not low <= value <= high


def _off_chart(name: str, values: list[float]) -> str:
    """A left-out series, with the nearest it comes to the axis."""
    above = [v for v in values if v > REL_LIMITS[1]]
    if len(above) == len(values):
        return f"{name} (>= {min(above):.3g}×)"
    below = [v for v in values if v < REL_LIMITS[0]]
    if len(below) == len(values):
        return f"{name} (<= {max(below):.3g}×)"
    return f"{name} ({min(values):.3g}-{max(values):.3g}×)"


def _edge_markers(ax, xs: list[float], ys: list[float], color: str, fill) -> None:
    """Points beyond REL_LIMITS: a triangle at the panel's top or bottom edge and the value."""
    edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for x, y in zip(xs, ys, strict=True):
        if not _outside(y):
            continue
        above = y > REL_LIMITS[1]
        at = 0.97 if above else 0.03
        ax.plot([x], [at], "^" if above else "v", color=color, markerfacecolor=fill, transform=edge)
        ax.annotate(
            f"{y:.3g}×",
            (x, at),
            xycoords=edge,
            xytext=(0, -11 if above else 6),  # beside the triangle, inside the panel
            textcoords="offset points",
            ha="center",
            fontsize=7,
            color=color,
        )


def _ylim(ax, shown: list[float], clipped: set[bool]) -> None:
    """The shown values and 1 with a margin, never narrower than 0.95-1.05; headroom on a side
    with edge triangles (``clipped`` holds ``True`` for above, ``False`` for below)."""
    low, high = min(shown + [0.95]), max(shown + [1.05])
    pad = max(0.02, 0.08 * (high - low))
    room = 2 * pad  # keeps the triangles clear of the highest (lowest) drawn point
    ax.set_ylim(low - pad - room * (False in clipped), high + pad + room * (True in clipped))


def _relative_panel(ax, panel: RelativePanel, colors: dict[str, str], with_paper: bool) -> bool:
    reference = colors.get(REFERENCE_LABEL, "black")
    ax.axhline(1.0, color=reference, linewidth=1.5, label=f"{REFERENCE_LABEL} (= 1)")
    shown: list[float] = []
    off: list[str] = []
    clipped: set[bool] = set()  # True: some point above the limits, False: below
    for (label, reported), points in panel.series.items():
        name = _label(label, reported, with_paper)
        xs = [x * 100 for x, _ in points]
        ys = [y for _, y in points]
        if all(_outside(y) for y in ys):
            off.append(_off_chart(name, ys))
            continue
        style, fill = ("--", "none") if reported else ("-", None)
        color = colors.get(label, "black")
        # NaN breaks the line where a point is beyond the limits instead of bending it there.
        ax.plot(
            xs,
            [float("nan") if _outside(y) else y for y in ys],
            style,
            marker="o",
            color=color,
            markerfacecolor=fill,
            label=name,
        )
        _edge_markers(ax, xs, ys, color, fill)
        shown += [y for y in ys if not _outside(y)]
        clipped |= {y > REL_LIMITS[1] for y in ys if _outside(y)}
    _ylim(ax, shown, clipped)
    ax.yaxis.set_minor_locator(AutoMinorLocator())
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.set_title(panel.title)
    ax.set_xlabel("compression ratio (%)")
    ax.set_ylabel(f"perplexity / {REFERENCE_LABEL} perplexity")
    _panel_notes(ax, off, clipped, panel.mismatched)
    return bool(panel.series)


def _panel_notes(ax, off: list[str], clipped: set[bool], mismatched: tuple[str, ...]) -> None:
    low, high = REL_LIMITS
    notes = []
    sides = [f"above {high:g}×"] * (True in clipped) + [f"below {low:g}×"] * (False in clipped)
    if sides:
        notes.append(f"Triangles at the edge: points {' or '.join(sides)}, value printed.")
    if off:
        notes.append(f"Not drawn, beyond {low:g}-{high:g}× at every ratio: {', '.join(off)}.")
    if mismatched:
        notes.append(
            f"Not drawn, {REFERENCE_LABEL} cell on another protocol: {', '.join(mismatched)}."
        )
    if notes:
        text = "\n".join(textwrap.fill(n, NOTE_WIDTH) for n in notes)
        ax.text(0.0, -0.16, text, transform=ax.transAxes, va="top", fontsize=7)


def _relative_figure(result: TableResult, path: Path):
    panels = relative_to_svd_llm(result)
    if not any(panel.series for panel in panels):
        return None
    labels = dict.fromkeys(r.label for r in result.spec.rows if r.ratio is not None)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # as in <table>.png
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _relative_panel(ax, panel, colors, result.spec.paper is not None)
    legend: dict[str, object] = {}
    for ax in axes[0]:  # a series may be drawn in one panel only
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(
        legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    fig.suptitle(
        f"{result.spec.title}\nperplexity relative to {REFERENCE_LABEL} at the same ratio "
        "(below 1: better than SVD-LLM)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _bar_figure(result: TableResult, path: Path):
    columns = [c for c in result.spec.columns if c.kind == "ppl"]
    if not columns:
        return None
    rows = result.cells
    width = 0.8 / (2 * len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(columns)), 4.5))
    drawn = False
    for i, cells in enumerate(rows):
        for j, column in enumerate(columns):
            cell = next(c for c in cells if c.column is column)
            base = j + (2 * i) * width - 0.4 + width / 2
            if cell.reproduced is not None:
                ax.bar(
                    base,
                    cell.reproduced,
                    width,
                    color=f"C{i % 10}",
                    label=f"{cell.row.label} (here)",
                )
                drawn = True
            rep = cell.reported
            if rep is not None and rep.value is not None:
                ax.bar(
                    base + width,
                    rep.value,
                    width,
                    color="none",
                    edgecolor=f"C{i % 10}",
                    hatch="//",
                    label=f"{cell.row.label} (paper)",
                )
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(columns)), [c.label for c in columns])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(
        unique.values(), unique.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    ax.set_title(result.spec.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_table(result: TableResult, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.png`` (perplexity), ``<name>_acc.png`` (accuracy) and ``<name>_rel.png``
    (perplexity relative to SVD-LLM) when there is data for them."""
    out_dir = Path(out_dir)
    name = result.spec.name
    ratios = {c.ratio for c in result.flat() if c.ratio is not None}
    written = []
    if len(ratios) > 1:
        written.append(_ratio_figure(result, "ppl", None, out_dir / f"{name}.png"))
        written.append(_ratio_figure(result, "acc", {"acc.mean"}, out_dir / f"{name}_acc.png"))
        if result.spec.relative:
            written.append(_relative_figure(result, out_dir / f"{name}_rel.png"))
    else:
        written.append(_bar_figure(result, out_dir / f"{name}.png"))
    return [p for p in written if p is not None]
