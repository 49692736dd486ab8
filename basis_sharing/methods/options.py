"""The choices of the whitened SVD methods beyond the papers' procedure (docs/methods.md §10).

One place for their vocabularies and checks, so the method classes, the results store and the
tables read them the same way.
"""

from __future__ import annotations

from typing import Any

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.whitening import WHITENINGS

# none; one_pass: Basis Sharing's refit on one pass of the compressed model (docs/methods.md §3.9);
# layerwise: SVD-LLM's, layer by layer on the deviated inputs (§4.3); sequential: layer by layer
# to the ORIGINAL model's outputs, compensating the earlier layers' error (§10.1).
UPDATES = ("none", "one_pass", "layerwise", "sequential")
ALLOCATIONS = ("uniform", "global")
ALLOCATION_SCOPES = ("kind", "all")
# shared=auto decides for every compressed kind, or only for the kinds the family's rule shares.
AUTO_CANDIDATES = ("all", "rule")

# What ``update: true`` means for each method: its paper's own refit.
OWN_UPDATE = {"svd_llm": "layerwise"}
DEFAULT_OWN_UPDATE = "one_pass"

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off", "none", "null")


def update_mode(method: str, value: Any) -> str:
    """``method.update`` as one of ``UPDATES`` (booleans: the method's own update, or none).

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    if value is None or value is False:
        return "none"
    if value is True:
        return OWN_UPDATE.get(method, DEFAULT_OWN_UPDATE)
    text = str(value).strip().lower()
    if text in _FALSE:
        return "none"
    if text in _TRUE:
        return OWN_UPDATE.get(method, DEFAULT_OWN_UPDATE)
    if text not in UPDATES:
        raise unknown_choice("method.update", value, (*UPDATES, "true", "false"))
    return text


def check_whitened_options(cfg: Any, method: str) -> None:
    """The choices every whitened SVD method has (``WhitenedSVDMethodConfig``)."""
    update_mode(method, cfg.get("update", False))  # an unknown name fails here
    if cfg.get("whitening", "cholesky") not in WHITENINGS:
        raise unknown_choice("method.whitening", cfg.whitening, WHITENINGS)
    if cfg.get("allocation", "uniform") not in ALLOCATIONS:
        raise unknown_choice("method.allocation", cfg.allocation, ALLOCATIONS)
    if cfg.get("allocation_scope", "kind") not in ALLOCATION_SCOPES:
        raise unknown_choice("method.allocation_scope", cfg.allocation_scope, ALLOCATION_SCOPES)
    if int(cfg.get("min_rank", 1)) < 1:
        raise ConfigError(f"method.min_rank={cfg.min_rank} must be >= 1.")
    check_refit_options(cfg, update_mode(method, cfg.get("update", False)))


def check_refit_options(cfg: Any, mode: str) -> None:
    """``refit_basis`` and ``refit_samples`` belong to the layer-by-layer refits,
    ``update=sequential`` and ``update=layerwise``."""
    refit_basis, samples = bool(cfg.get("refit_basis", False)), cfg.get("refit_samples")
    if mode not in ("sequential", "layerwise") and refit_basis:
        raise ConfigError(
            "method.refit_basis is an option of method.update=sequential or layerwise "
            f"(got method.update={mode})."
        )
    if mode not in ("sequential", "layerwise") and samples is not None:
        raise ConfigError(
            "method.refit_samples is an option of method.update=sequential or layerwise "
            f"(got method.update={mode}, refit_samples={samples})."
        )
    if samples is not None and int(samples) < 1:
        raise ConfigError(f"method.refit_samples={samples} must be >= 1 (or null: every sample).")
