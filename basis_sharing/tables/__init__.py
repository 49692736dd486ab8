"""Paper-style tables and plots built only from the results store and the paper's numbers.

make_table("table1")   # -> results/tables/table1.{md,csv,tex}, table1.png, _acc.png, _rel.png
"""

from __future__ import annotations

import logging
from pathlib import Path

from basis_sharing.tables.build import TableResult, build_table
from basis_sharing.tables.paper import PAPER_ROOT, load_paper
from basis_sharing.tables.render import to_csv, to_latex, to_markdown
from basis_sharing.tables.specs import SPECS, TableSpec, get_spec
from basis_sharing.tracking.store import STORE_ROOT, load_runs

log = logging.getLogger(__name__)

TABLES_ROOT = Path("results") / "tables"

__all__ = [
    "SPECS",
    "TableResult",
    "TableSpec",
    "build_table",
    "get_spec",
    "load_paper",
    "make_table",
    "write_table",
]


def write_table(result: TableResult, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Markdown, CSV and LaTeX (and the plots) of a filled table; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result.spec.name
    written = []
    for suffix, text in (
        ("md", to_markdown(result)),
        ("csv", to_csv(result)),
        ("tex", to_latex(result)),
    ):
        path = out_dir / f"{name}.{suffix}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if plots:
        from basis_sharing.tables.plots import plot_table

        written += plot_table(result, out_dir)
    return written


def make_table(
    name: str,
    runs_root: str | Path = STORE_ROOT,
    paper_root: str | Path = PAPER_ROOT,
    out_dir: str | Path = TABLES_ROOT,
    *,
    plots: bool = True,
) -> list[Path]:
    """Build table ``name`` from the store under ``runs_root`` and write it to ``out_dir``."""
    spec = get_spec(name)
    paper = load_paper(paper_root) if spec.paper is not None or spec.ordering else None
    result = build_table(spec, load_runs(runs_root), paper)
    filled = sum(c.reproduced is not None for c in result.flat())
    log.info("%s: %d of %d cells reproduced", spec.name, filled, len(result.flat()))
    return write_table(result, out_dir, plots=plots)
