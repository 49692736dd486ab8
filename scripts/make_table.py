"""Render paper-style tables from the results store.

    python scripts/make_table.py table1                 # results/tables/table1.{md,csv,tex,png}
                                                        # and table1_acc.png, table1_rel.png
    python scripts/make_table.py table-smollm --no-plot
    python scripts/make_table.py all --runs tests/data/store --out /tmp/tables

Every table reads only results/runs/**/results.json (collect them first: make collect RUNS=...)
and results/paper/*.csv, so it regenerates offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basis_sharing.tables import SPECS, make_table  # noqa: E402
from basis_sharing.tables.paper import PAPER_ROOT  # noqa: E402
from basis_sharing.tracking.store import STORE_ROOT  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", help=f"table names or 'all': {', '.join(SPECS)}")
    parser.add_argument("--runs", default=REPO / STORE_ROOT, help="results store root")
    parser.add_argument("--paper", default=REPO / PAPER_ROOT, help="paper CSV directory")
    parser.add_argument("--out", default=REPO / "results" / "tables", help="output directory")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(SPECS) if args.tables == ["all"] else args.tables
    for name in names:
        try:
            paths = make_table(name, args.runs, args.paper, args.out, plots=not args.no_plot)
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
