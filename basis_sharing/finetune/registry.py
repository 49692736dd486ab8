"""Name-keyed registry of fine-tuners (docs/architecture.md §9).

A fine-tuner is a class registered with ``@register_finetuner("name", schema=...)``; the Hydra
``finetune`` group selects it by ``finetune.name``. Registering it registers its config schema
(``schema/finetune/<name>``), so its settings are written once, in its own file. The finetune stage
calls ``finetune`` once, between compress and save, on the compressed model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from basis_sharing.config import register_option_schema
from basis_sharing.errors import unknown_choice
from basis_sharing.models.families import FamilyAdapter

NO_FINETUNE = "none"  # the option that puts no finetune stage in the run


@dataclass
class FinetuneContext:
    """What a fine-tuner may use besides the model: the run's device, tokenizer and folders."""

    device: torch.device
    tokenizer: Any
    out_dir: Path  # the run directory (checkpoints go below it)
    data_dir: str  # the data mirror
    offline: bool
    seed: int


class Finetuner:
    """Base class: trains a compressed model in place and returns facts for the run record."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check_config(self) -> None:
        """Refuse settings that are wrong whatever the model; runs before any data is read."""

    def finetune(self, model: nn.Module, family: FamilyAdapter, ctx: FinetuneContext) -> dict:
        raise NotImplementedError


FINETUNERS: dict[str, type[Finetuner]] = {}


def register_finetuner(name: str, schema: type) -> Callable[[type[Finetuner]], type[Finetuner]]:
    """Register a fine-tuner class and its config schema under ``name``."""

    def wrap(cls: type[Finetuner]) -> type[Finetuner]:
        if name in FINETUNERS or name == NO_FINETUNE:
            raise ValueError(f"fine-tuner '{name}' registered twice")
        cls.name = name
        FINETUNERS[name] = cls
        register_option_schema("finetune", name, schema)
        return cls

    return wrap


def get_finetuner(cfg: Any) -> Finetuner | None:
    """The fine-tuner named by ``cfg.name``; None for ``finetune=none``."""
    if cfg.name == NO_FINETUNE:
        return None
    if cfg.name not in FINETUNERS:
        raise unknown_choice("fine-tuner (finetune)", cfg.name, [NO_FINETUNE, *FINETUNERS])
    finetuner = FINETUNERS[cfg.name](cfg)
    finetuner.check_config()
    return finetuner
