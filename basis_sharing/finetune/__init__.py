"""Training after compression (the ``finetune`` config group): registered fine-tuners.

``finetune=none`` is no fine-tuner at all: the run's stage list has no finetune stage.
"""

from basis_sharing.finetune.registry import (
    FINETUNERS,
    FinetuneContext,
    Finetuner,
    get_finetuner,
    register_finetuner,
)

__all__ = ["FINETUNERS", "FinetuneContext", "Finetuner", "get_finetuner", "register_finetuner"]
