"""What code produced a file: installed package versions and the project's git state.

A leaf utility, so that low layers (a saved model's manifest) can stamp versions without reaching
up into the run record, which gathers the same facts for ``results.json``.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution in ``names``; None for one not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str | bool | None]:
    """Commit sha of the project checkout and whether tracked files differ from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}
