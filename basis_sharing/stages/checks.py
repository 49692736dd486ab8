"""Checks the stages run once the model's shapes (and later its counts) are known.

``check_shapes`` reads the model's ``config.json`` and builds the model on the meta device (no
weights are allocated, seconds even for 30B), so that everything the shapes decide is refused
before the weights are loaded and calibrated: a context longer than the model's positions,
projection kinds the family does not have, a group size above the layer count, a ratio that leaves
a rank of 0, an achieved ratio (from the method's rank plan) outside the tolerance, and fine-tuning
targets that match no module of the compressed model the plan describes.
``check_ratio`` refuses the same miss on the compressed model's counted parameters.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from basis_sharing.errors import UserError
from basis_sharing.evaluation.params import dense_projection_weights
from basis_sharing.finetune.registry import Finetuner
from basis_sharing.methods.plan import planned_params
from basis_sharing.methods.registry import CompressionMethod
from basis_sharing.models.families import FamilyAdapter, family_for_model_type, get_family
from basis_sharing.models.loading import (
    ModelSource,
    check_context_length,
    max_positions,
    meta_model,
    read_model_config,
)


def check_shapes(
    cfg: DictConfig,
    method: CompressionMethod,
    source: ModelSource,
    finetuner: Finetuner | None = None,
) -> dict[str, Any]:
    """Checks from the model's config and shapes; returns what they found, for the record."""
    hf_config = read_model_config(source.path)
    check_context_length(hf_config, cfg.model.context_length, cfg.model.name)
    family = model_family(cfg.model.family, hf_config.model_type)
    method.check_config(family)
    model = meta_model(hf_config)
    found: dict[str, Any] = {
        "family": family.name,
        "layers": len(family.layers(model)),
        "max_positions": max_positions(hf_config),
    }
    plans = method.shape_plan(model, family, float(cfg.ratio)) if method.compresses else None
    if plans is not None:
        # Over the kinds the ratio is a fraction of (every projection unless the method says).
        dense = dense_projection_weights(model, family, method.budget_kinds(family))
        predicted = 1.0 - planned_params(plans, dense)["kept"] / dense
        found["predicted_ratio"] = predicted
        kinds = method.budget_kinds(family)
        check_ratio(predicted, cfg.ratio, cfg.ratio_tolerance, planned=True, kinds=kinds)
    if finetuner is not None:
        finetuner.check_shapes(model, family, plans if method.compresses else [])
    return found


def model_family(name: str | None, model_type: str) -> FamilyAdapter:
    return get_family(name) if name else family_for_model_type(model_type)


def check_ratio(
    achieved: float,
    target: float,
    tolerance: float,
    planned: bool = False,
    kinds: tuple[str, ...] | None = None,
) -> None:
    """Refuse a compression whose achieved ratio misses the target by more than ``tolerance``.

    Args:
        kinds: the projection kinds the ratio is over (None: every decoder projection).
    """
    if abs(achieved - target) <= tolerance:
        return
    what = (
        "The rank plan (from the model's shapes, before any weight is loaded) compresses"
        if planned
        else "Achieved compression of"
    )
    raise UserError(
        f"{what} {scope(kinds)} {'by ' if planned else 'is '}{achieved:.4f}, which misses "
        f"the target ratio {target} by more than {tolerance * 100:.2f} percentage points "
        "(ratio_tolerance). Rank rounding on small matrices or a smaller last layer group "
        "(method.group_size that does not divide the layer count; method.remainder_rank=own "
        "sizes its rank to its own layers) can cause this."
    )


def scope(kinds: tuple[str, ...] | None) -> str:
    return "the decoder projections" if kinds is None else f"the {'/'.join(kinds)} projections"
