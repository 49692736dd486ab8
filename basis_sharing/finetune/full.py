"""``finetune=full``: every parameter of the compressed model trained (docs/methods.md §6.2-§6.3).

``model.parameters()`` lists a shared basis once (it is registered once, in
``model.shared_bases``), so it is one tensor with one optimizer state, whose gradient sums the
contributions of every member of its group; after training every member still computes with that
one tensor (checked).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from basis_sharing.finetune.common import TrainingConfig, TrainingFinetuner
from basis_sharing.finetune.registry import FinetuneContext, register_finetuner
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import SHARED_BASES, CompressedLinear


@dataclass
class FullFinetuneConfig(TrainingConfig):
    """The paper's full fine-tuning (Table 8; §6.2): lr 2e-6, accumulation 8, 3 epochs."""

    epochs: int = 3
    lr: float = 2e-6
    weight_decay: float = 0.001
    max_grad_norm: float = 0.01
    grad_accum: int = 8


def check_bases_shared(model: nn.Module) -> int:
    """Every member's basis is its group's registry entry; returns the number of shared bases."""
    registry = getattr(model, SHARED_BASES, None)
    for module in model.modules():
        key = module.shared_basis_key if isinstance(module, CompressedLinear) else None
        if key is not None and module.basis is not registry[key]:
            raise RuntimeError(f"a member of {key} no longer uses the shared basis")
    return 0 if registry is None else len(registry)


@register_finetuner("full", schema=FullFinetuneConfig)
class FullFinetuner(TrainingFinetuner):
    """All parameters (embeddings, norms, factors, a shared basis as one tensor) trained."""

    def prepare(self, model: nn.Module, family: FamilyAdapter):
        for param in model.parameters():
            param.requires_grad_(True)
        return model, {"shared_bases": check_bases_shared(model)}

    def finish(self, trained: nn.Module, model: nn.Module, ctx: FinetuneContext) -> dict:
        check_bases_shared(model)
        return {}
