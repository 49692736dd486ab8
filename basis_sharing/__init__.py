"""basis-sharing: reproduce and extend cross-layer parameter-sharing compression of LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

from basis_sharing.models.compressed_io import load_compressed, save_compressed  # noqa: E402

__all__ = ["__version__", "load_compressed", "save_compressed"]
