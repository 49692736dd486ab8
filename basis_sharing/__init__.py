"""basis-sharing: reproduce and extend cross-layer parameter-sharing compression of LLMs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_compressed", "save_compressed"]

# The public API is imported on first use: importing any subpackage runs this file first, and
# the pure layers (linalg/ above all) must not pull in transformers or Hydra through it.
_LAZY = {
    "load_compressed": "basis_sharing.models.compressed_io",
    "save_compressed": "basis_sharing.models.compressed_io",
}

if TYPE_CHECKING:
    from basis_sharing.models.compressed_io import load_compressed, save_compressed


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'basis_sharing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
