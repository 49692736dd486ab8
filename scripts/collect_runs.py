"""Copy finished runs from Hydra's output directories into the results store.

    python scripts/collect_runs.py outputs/experiments/table1   # results/runs/llama7b/table1/<job>/
    python scripts/collect_runs.py outputs/multiruns/2026-01-01/12-00-00 --name bs_vs_svdllm
    python scripts/collect_runs.py outputs/runs/2026-01-01/12-00-00_llama7b_dense --name dense

Only completed records are copied; a destination that exists with different content is kept
unless --overwrite. Tables are then rebuilt from the store (make table1 ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basis_sharing.tracking.store import STORE_ROOT, collect  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a Hydra sweep or run directory (or a parent)")
    parser.add_argument("--name", help="collection name (default: the directory's name)")
    parser.add_argument("--dest", type=Path, default=REPO / STORE_ROOT, help="store root")
    parser.add_argument("--overwrite", action="store_true", help="replace differing records")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a directory")
    report = collect(args.runs, args.name, args.dest, overwrite=args.overwrite)
    for path in report.copied:
        print(f"copied     {path}")
    for path in report.conflicts:
        print(f"kept       {path} (differs; --overwrite replaces it)")
    print(
        f"{len(report.copied)} copied, {len(report.unchanged)} already there, "
        f"{len(report.conflicts)} conflicts, {len(report.not_completed)} not completed, "
        f"{len(report.unreadable)} unreadable"
    )
    return 1 if report.conflicts or report.unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
