"""Parameter accounting: the compression-ratio definition of docs/methods.md §1.3.

The ratio counts only the weights of the decoder-block projections (q, k, v, o, up, gate, down, or
GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj). Embeddings, lm_head, norms and biases are neither
compressed nor counted. A tensor shared by several layers is counted once.
"""

from __future__ import annotations

from torch import nn

# dense_projection_weights lives with the family adapter (the methods below this layer need it);
# re-exported here with the rest of the accounting.
from basis_sharing.models.families import FamilyAdapter, dense_projection_weights  # noqa: F401
from basis_sharing.modules import SHARED_BASES, count_kept


def projection_modules(
    model: nn.Module, family: FamilyAdapter, kinds: tuple[str, ...] | None = None
) -> list[nn.Module]:
    """Every projection leaf (of ``kinds``; None: all), plus the registry of shared bases."""
    modules = [
        family.module(layer, kind)
        for layer in family.layers(model)
        for kind in (family.kinds if kinds is None else kinds)
    ]
    registry = getattr(model, SHARED_BASES, None)
    return modules + ([registry] if registry is not None else [])


def count_total(model: nn.Module) -> int:
    """All parameters, each shared tensor once (``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def count_projection_weights(
    model: nn.Module, family: FamilyAdapter, kinds: tuple[str, ...] | None = None
) -> int:
    """Kept projection weights: each module counts its own, a shared tensor counted once.

    The registry of shared bases comes last, so only a basis no projection uses is added there.
    """
    seen: set[int] = set()
    return sum(count_kept(module, seen) for module in projection_modules(model, family, kinds))


def parameter_report(
    model: nn.Module,
    family: FamilyAdapter,
    dense_projections: int,
    budget: tuple[tuple[str, ...], int] | None = None,
) -> dict:
    """Counts for results.json.

    Args:
        dense_projections: projection weights of the uncompressed model (before surgery).
        budget: (kinds, their dense weights) when the method's ``ratio`` is a fraction of some
            projection kinds only (e.g. FiPS: the MLP); the report then has a ``budget`` section
            with the ratio achieved over those kinds, the one the target is checked against.
    """
    projections = count_projection_weights(model, family)
    report = {
        "total": count_total(model),
        "decoder_projections": projections,
        "dense_decoder_projections": dense_projections,
        "achieved_ratio": 1.0 - projections / dense_projections,
    }
    if budget is not None:
        kinds, dense = budget
        kept = count_projection_weights(model, family, tuple(kinds))
        report["budget"] = {
            "kinds": list(kinds),
            "dense": dense,
            "kept": kept,
            "achieved_ratio": 1.0 - kept / dense,
        }
    return report


def budget_ratio(params: dict) -> float:
    """The achieved ratio the target is checked against: over the budget's kinds, or all."""
    budget = params.get("budget")
    return budget["achieved_ratio"] if budget else params["achieved_ratio"]
