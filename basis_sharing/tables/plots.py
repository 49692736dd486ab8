"""Plots beside each table: perplexity (log scale) and mean accuracy against the ratio.

Reproduced values are solid lines with filled markers, reported ones dashed with hollow markers
in the same colour, the uncompressed model a dotted horizontal line. A table with a single ratio
(Tables 3-5) is drawn as grouped bars per column instead. Missing cells are simply absent.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402

from basis_sharing.tables.build import Cell, TableResult  # noqa: E402

DPI = 120


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
    """Write ``<name>.png`` (perplexity) and ``<name>_acc.png`` (accuracy) when there is data."""
    out_dir = Path(out_dir)
    name = result.spec.name
    ratios = {c.ratio for c in result.flat() if c.ratio is not None}
    written = []
    if len(ratios) > 1:
        written.append(_ratio_figure(result, "ppl", None, out_dir / f"{name}.png"))
        written.append(_ratio_figure(result, "acc", {"acc.mean"}, out_dir / f"{name}_acc.png"))
    else:
        written.append(_bar_figure(result, out_dir / f"{name}.png"))
    return [p for p in written if p is not None]
