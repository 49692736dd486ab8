"""Training after compression (the ``finetune`` config group): registered fine-tuners.

``finetune=none`` is no fine-tuner at all: the run's stage list has no finetune stage.
``finetune=lora`` (PEFT LoRA, merged back) and ``finetune=full`` (every parameter) are registered
by importing their modules here (docs/methods.md §6).
"""

from basis_sharing.finetune import full, lora  # noqa: F401  (register the fine-tuners)
from basis_sharing.finetune.registry import (
    FINETUNERS,
    FinetuneContext,
    Finetuner,
    get_finetuner,
    register_finetuner,
)

__all__ = ["FINETUNERS", "FinetuneContext", "Finetuner", "get_finetuner", "register_finetuner"]
