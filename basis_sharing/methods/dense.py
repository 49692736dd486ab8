"""The uncompressed model: the "Original" row of the paper's tables."""

from __future__ import annotations

from torch import nn

from basis_sharing.methods.registry import CompressionContext, CompressionMethod, register_method
from basis_sharing.models.families import FamilyAdapter


@register_method("dense")
class Dense(CompressionMethod):
    compresses = False

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        return {}


@register_method("none")
class NoCompression(Dense):
    """Evaluate the model as loaded: with ``load_model=<dir>``, a saved compressed model."""
