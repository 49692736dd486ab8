"""The load flow's stages: a saved compressed model instead of a base model and a method.

``load_model=<dir>`` runs prepare's data and tokenize stages around these two, then evaluates:
no calibration and no compression, and none of the base model's source is resolved.
"""

from __future__ import annotations

from pathlib import Path

from basis_sharing.models.compressed_io import load_compressed, read_manifest
from basis_sharing.models.loading import ModelSource, load_tokenizer
from basis_sharing.runtime import weight_device
from basis_sharing.stages.compress import account
from basis_sharing.stages.state import RunState


def resolve_saved(state: RunState) -> None:
    """The saved model's manifest (its base model goes to the record) and its tokenizer."""
    state.saved = Path(state.cfg.load_model).expanduser()
    manifest, _ = read_manifest(state.saved)
    state.tokenizer = load_tokenizer(ModelSource(state.saved))
    base = manifest["info"].get("base_model", {})
    state.record["model"].update(base, loaded_from=str(state.saved))


def load_saved(state: RunState) -> None:
    """The compressed model (integrity-checked) where the runtime keeps its weights, and its
    parameter report."""
    record = state.record
    loaded = load_compressed(state.saved, weight_device(state.cfg.runtime, state.plan.device))
    state.model, state.family = loaded.model, loaded.family
    record["loaded_compression"] = loaded.manifest["info"]
    record["target_ratio"] = loaded.manifest["info"].get("target_ratio")
    state.dense_weights = dense_weights_of(state.model, state.family, loaded.manifest["layout"])
    record["model"]["family"] = state.family.name
    record["method_info"] = {}
    account(state)


def dense_weights_of(model, family, layout: list[dict]) -> int:
    """Uncompressed projection weights of a loaded model: compressed entries from the layout."""
    compressed = {(e["layer"], e["kind"]): e["d_in"] * e["d_out"] for e in layout}
    total = 0
    for i, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            if (i, kind) in compressed:
                total += compressed[(i, kind)]
            else:
                d_in, d_out = family.shape(layer, kind)
                total += d_in * d_out
    return total
