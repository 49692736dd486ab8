"""The uncompressed model: the "Original" row of the paper's tables; and ``none``, a loaded one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from basis_sharing.methods.registry import (
    CompressionContext,
    CompressionMethod,
    MethodConfig,
    register_method,
)
from basis_sharing.models.families import FamilyAdapter


@dataclass
class DenseMethodConfig(MethodConfig):
    """No compression: the "Original" row of the paper's tables."""


@dataclass
class NoMethodConfig(MethodConfig):
    """No compression step: evaluate a model as loaded (with load_model=<dir>, a saved one)."""


@register_method("dense", schema=DenseMethodConfig)
class Dense(CompressionMethod):
    label = "Original"
    compresses = False

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        return {}


@register_method("none", schema=NoMethodConfig)
class NoCompression(Dense):
    """Evaluate the model as loaded: with ``load_model=<dir>``, a saved compressed model."""

    label = "Loaded"
