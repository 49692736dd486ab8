"""``finetune=lora``: PEFT LoRA on the compressed model, merged back (docs/methods.md §6.1-§6.3).

The adapters sit on the modules ``finetune.targets`` selects (``finetune/targets.py``). A shared
basis is one module in ``model.shared_bases``: PEFT replaces it there by one LoRA layer, which
every member of the group then finds when it looks its basis up, so exactly one adapter serves
the whole group (checked below). After training the adapters are merged into the factors they
sit on (W <- W + (alpha / r) B A), so the model is again a plain compressed model with the same
parameter count, which ``save_model=true`` writes and ``load_model=`` reloads as ever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basis_sharing.errors import ConfigError
from basis_sharing.finetune.common import TrainingConfig, TrainingFinetuner
from basis_sharing.finetune.loop import CHECKPOINT_DIR
from basis_sharing.finetune.registry import FinetuneContext, register_finetuner
from basis_sharing.finetune.targets import (
    candidates,
    check_targets,
    planned_candidates,
    select,
    summary,
)
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import SHARED_BASES, CompressedLinear

log = logging.getLogger(__name__)

LORA_BIASES = ("none", "all", "lora_only")
ADAPTER_DIR = "adapter"  # <run dir>/finetune/adapter with finetune.save_adapter=true


@dataclass
class LoraFinetuneConfig(TrainingConfig):
    """PEFT LoRA with the paper's settings (r 8, alpha 32, lr 1e-4, 2 epochs; §6.2)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    bias: str = "none"
    targets: Any = "paper"  # paper / coefficients / shared_bases / all / [patterns]
    save_adapter: bool = False  # also write the trained adapter alone, in PEFT's format

    @staticmethod
    def check(node: Any) -> None:
        TrainingConfig.check(node)
        if node.r < 1:
            raise ConfigError(f"finetune.r={node.r} must be >= 1.")
        if not node.alpha > 0:
            raise ConfigError(f"finetune.alpha={node.alpha} must be > 0.")
        if not 0.0 <= node.dropout < 1.0:
            raise ConfigError(f"finetune.dropout={node.dropout} must be in [0, 1).")
        if node.bias not in LORA_BIASES:
            raise ConfigError(
                f"finetune.bias={node.bias!r}: use one of {', '.join(LORA_BIASES)} (PEFT's)."
            )
        targets = node.targets
        check_targets(targets if isinstance(targets, str) else list(targets or []))


def plain_targets(targets: Any) -> Any:
    return targets if isinstance(targets, str) else [str(t) for t in targets]


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every LoRA layer, each module once."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_one_adapter_per_basis(model: nn.Module, shared: list[str]) -> None:
    """Each adapted shared basis is one LoRA layer, and every member computes with it."""
    from peft.tuners.lora import LoraLayer

    registry = getattr(model, SHARED_BASES, None)
    for name in shared:
        key = name.split(".", 1)[1]
        if not isinstance(registry[key], LoraLayer):
            raise RuntimeError(f"the shared basis {name} got no adapter")
    for module in model.modules():
        key = module.shared_basis_key if isinstance(module, CompressedLinear) else None
        if key is not None and f"{SHARED_BASES}.{key}" in shared:
            if module.basis is not registry[key]:
                raise RuntimeError(f"a member of {key} does not see its adapter")


@register_finetuner("lora", schema=LoraFinetuneConfig)
class LoraFinetuner(TrainingFinetuner):
    """LoRA adapters (PEFT) on the selected modules, trained with the Trainer, then merged."""

    def check_config(self) -> None:
        LoraFinetuneConfig.check(self.cfg)

    def check_shapes(self, model: nn.Module, family: FamilyAdapter, plans: list | None) -> None:
        """``finetune.targets`` must match a module of the compressed model the plan describes."""
        if plans is not None:
            found = planned_candidates(plans, family, len(family.layers(model)))
            select(found, plain_targets(self.cfg.targets))

    def adapt(self, model: nn.Module, family: FamilyAdapter):
        """The PEFT-wrapped model and the summary of where its adapters sit.

        Raises:
            ConfigError: the targets match no module of this model (the message lists what
                exists).
        """
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg
        chosen = select(candidates(model, family), plain_targets(cfg.targets))
        torch.manual_seed(cfg.seed)  # LoRA A's initialisation
        peft_cfg = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            bias=cfg.bias,
            target_modules=[c.name for c in chosen],
        )
        wrapped = get_peft_model(model, peft_cfg)
        layers = lora_layers(model)
        if len(layers) != len(chosen):
            raise RuntimeError(f"{len(chosen)} modules were targeted but {len(layers)} adapted")
        check_one_adapter_per_basis(model, [c.name for c in chosen if c.role == "shared_basis"])
        adapters = summary(chosen)
        log.info(
            "LoRA r=%d on %d modules: %s",
            cfg.r,
            adapters["count"],
            ", ".join(f"{n} {role}" for role, n in adapters["by_role"].items()),
        )
        return wrapped, adapters

    def prepare(self, model: nn.Module, family: FamilyAdapter):
        wrapped, adapters = self.adapt(model, family)
        return wrapped, {"targets": plain_targets(self.cfg.targets), "adapters": adapters}

    def finish(self, trained: nn.Module, model: nn.Module, ctx: FinetuneContext) -> dict:
        info: dict[str, Any] = {}
        if self.cfg.save_adapter:
            path = ctx.out_dir / CHECKPOINT_DIR / ADAPTER_DIR
            trained.save_pretrained(str(path))
            info["adapter_dir"] = str(path)
        merge(trained, model)
        return info


def merge(wrapped: nn.Module, model: nn.Module) -> nn.Module:
    """Merge every adapter into the module it sits on and drop the PEFT wrapping, in place."""
    merged = wrapped.merge_and_unload()
    if merged is not model:
        raise RuntimeError("PEFT returned another model than the one it wrapped")
    if lora_layers(model):
        raise RuntimeError("LoRA layers are left after the merge")
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return model
