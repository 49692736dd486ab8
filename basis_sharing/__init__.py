"""basis-sharing: reproduce and extend cross-layer parameter-sharing compression of LLMs."""

from __future__ import annotations

__version__ = "0.1.0"
