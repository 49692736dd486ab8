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
    context_length: int = 2048  # model.context_length: the training blocks' default length
    fingerprint: str = ""  # the run's config fingerprint: an epoch checkpoint must match it


class Finetuner:
    """Base class: trains a compressed model in place and returns facts for the run record."""

    name: ClassVar[str] = ""
    schema: ClassVar[type] = object  # its settings' dataclass, set by register_finetuner

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check_config(self) -> None:
        """Refuse settings that are wrong whatever the model; runs before any data is read."""

    def check_run(self, run_cfg: Any) -> None:
        """Refuse what the rest of the run's config makes wrong (its data, its model's context).

        Runs during validation, before any model is loaded, with the whole composed config.
        """

    def check_shapes(self, model: nn.Module, family: FamilyAdapter, plans: list | None) -> None:
        """Refuse what the compressed model's shapes make wrong, before any weight is loaded.

        ``model`` is the base model on the meta device; ``plans`` the method's rank plan
        (``[]``: nothing is compressed; None: the plan needs data, so only the stage can check).
        """

    def finetune(self, model: nn.Module, family: FamilyAdapter, ctx: FinetuneContext) -> dict:
        raise NotImplementedError


FINETUNERS: dict[str, type[Finetuner]] = {}


def register_finetuner(name: str, schema: type) -> Callable[[type[Finetuner]], type[Finetuner]]:
    """Register a fine-tuner class and its config schema under ``name``."""

    def wrap(cls: type[Finetuner]) -> type[Finetuner]:
        if name in FINETUNERS or name == NO_FINETUNE:
            raise ValueError(f"fine-tuner '{name}' registered twice")
        cls.name = name
        cls.schema = schema
        FINETUNERS[name] = cls
        register_option_schema("finetune", name, schema)
        return cls

    return wrap


def get_finetuner(cfg: Any, run_cfg: Any = None) -> Finetuner | None:
    """The fine-tuner named by ``cfg.name``; None for ``finetune=none``.

    With ``run_cfg`` (the whole composed config, as validation passes it) its ``check_run`` runs
    too.
    """
    if cfg.name == NO_FINETUNE:
        return None
    if cfg.name not in FINETUNERS:
        raise unknown_choice("fine-tuner (finetune)", cfg.name, [NO_FINETUNE, *FINETUNERS])
    finetuner = FINETUNERS[cfg.name](cfg)
    finetuner.check_config()
    if run_cfg is not None:
        finetuner.check_run(run_cfg)
    return finetuner
