"""Name-keyed registry of compression methods (docs/architecture.md §5.4).

A method is a class registered with ``@register_method("name", schema=SettingsClass)``; the Hydra
``method`` group selects it by ``method.name``. Registering the class registers its settings'
dataclass too (``config.register_option_schema``), so a method file holds every fact about its
method: the schema and range checks of its settings, its table label, the statistics it reads,
whether it runs block by block, and its rank plan. The pipeline asks a method what it needs before
any heavy work starts (``needs_calibration``) and then calls ``compress`` once on the loaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, is_dataclass
from typing import Any, ClassVar

import torch
from omegaconf import MISSING
from torch import nn

from basis_sharing.calibration.statistics import forward_autocast
from basis_sharing.config import register_option_schema
from basis_sharing.errors import unknown_choice
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.models.families import FamilyAdapter


@dataclass
class MethodConfig:
    """What every method's settings have: ``name`` selects the registered class."""

    name: str = MISSING


@dataclass
class CompressionContext:
    """What a method may use: the run's settings and the calibration blocks (when it needs any)."""

    ratio: float
    device: torch.device
    calibration_ids: torch.Tensor | None = None  # (n_samples, seq_len)
    stats: Any = None  # calibration statistics (GramStats) when the method needs them
    calib_batch_size: int = 1
    # Key of the whole calibration setup (model, tokens, Gram dtype); with ``caches``, the key
    # under which decompositions and sensitivities are reused by the jobs of a sweep.
    stats_key: str | None = None
    gram_dtype: torch.dtype = torch.float32  # accumulation dtype of Grams the method collects
    # Reused across the jobs of a sweep (owned by whoever runs the jobs); None: compute afresh.
    caches: SweepCaches | None = None
    # runtime.BlockRunner of runtime=sequential (weights on the CPU, one block on the device at a
    # time); None: runtime=full, the whole model on ``device``.
    runner: Any = None
    # calibration.forward_dtype (a torch dtype name): the autocast dtype of the method's own
    # Gram-collecting forward passes (the updates'), as of the calibration pass; None: the model's.
    forward_dtype: str | None = None

    def autocast(self) -> AbstractContextManager:
        """The method's forward passes under ``forward_dtype`` (a no-op context when None);
        the statistics and solves inside stay in their own dtypes (``exact``).

        Autocast's weight-cast cache is off: the updates change weights in place between the
        calls of one pass, and a cached low-precision copy would keep the weights before the
        refit (the layerwise test's oracle caught exactly that)."""
        return forward_autocast(self.device, self.forward_dtype, cache_enabled=False)

    def exact(self) -> AbstractContextManager:
        """Autocast off: the linear algebra between a method's forward calls (the Grams, the
        solves, the re-derived bases, the errors) in the dtypes it asks for."""
        return torch.autocast(self.device.type, enabled=False)


class CompressionMethod:
    """Base class: a method compresses a model in place and returns facts for the run record."""

    name: ClassVar[str] = ""
    schema: ClassVar[type[MethodConfig]] = MethodConfig  # its settings, set by register_method
    label: ClassVar[str] = ""  # the row label in the paper-style tables, e.g. "SVD-LLM"
    needs_calibration: ClassVar[bool] = False
    compresses: ClassVar[bool] = True  # False for the dense baseline: no target ratio applies
    # Calibration statistics the method reads from ``ctx.stats`` ("gram", "scale", "fisher").
    stats_needed: ClassVar[frozenset[str]] = frozenset()
    # Whether it can run with runtime=sequential (one decoder block on the device at a time).
    supports_sequential: ClassVar[bool] = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        raise NotImplementedError

    def check_config(self, family: FamilyAdapter | None) -> None:
        """Refuse settings that are wrong whatever the model (``family`` when already known).

        Runs before any data or weights are read; raises ``ConfigError``.
        """

    def budget_kinds(self, family: FamilyAdapter) -> tuple[str, ...] | None:
        """The projection kinds whose weights ``ratio`` is the fraction removed of.

        None (the default): every decoder projection. A method compressing some kinds only (FiPS:
        the MLP; ``method.kinds``) names them, and the ratio is checked over their weights.
        """
        return None

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float) -> list | None:
        """The rank plan from the model's shapes alone (``model`` may live on the meta device).

        None when the plan needs data (a sensitivity search). The pipeline uses it to check the
        achieved ratio before the weights are loaded.
        """
        return None


METHODS: dict[str, type[CompressionMethod]] = {}


def register_method(
    name: str, *, schema: type[MethodConfig]
) -> Callable[[type[CompressionMethod]], type[CompressionMethod]]:
    """Register a method class under ``name`` with ``schema``, the dataclass of its settings.

    The schema becomes ``schema/method/<name>`` in Hydra's ConfigStore, which
    ``conf/method/<name>.yaml`` lists first in its defaults: a typo'd or wrongly typed
    ``method.<key>`` then fails when the config is composed.
    """
    if not (isinstance(schema, type) and is_dataclass(schema) and issubclass(schema, MethodConfig)):
        raise TypeError(f"method '{name}': schema must be a MethodConfig dataclass, not {schema!r}")

    def wrap(cls: type[CompressionMethod]) -> type[CompressionMethod]:
        if name in METHODS:
            raise ValueError(f"method '{name}' registered twice")
        register_option_schema("method", name, schema)
        cls.name, cls.schema = name, schema
        METHODS[name] = cls
        return cls

    return wrap


def get_method(cfg: Any) -> CompressionMethod:
    """Instantiate the method named by ``cfg.name`` with its config node."""
    if cfg.name not in METHODS:
        raise unknown_choice("method", cfg.name, list(METHODS))
    return METHODS[cfg.name](cfg)
