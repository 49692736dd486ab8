"""The ``runtime`` config group: where the model runs while it is calibrated, compressed, scored.

- ``runtime=full``: the whole model on the device (the default; what every earlier run did).
- ``runtime=sequential``: the weights stay on the CPU and one decoder block at a time goes to the
  device (``sequential.BlockRunner``); the calibration hidden states wait on the CPU between
  blocks, or on the device with ``runtime.hidden_states=device`` (faster, needs room for them).
  Grams, the updates and perplexity give the same numbers as with ``full``.

Either one can calibrate data-parallel under ``torchrun`` (``distributed.py``);
``runtime.distributed_backend`` picks the process group's backend.

The schemas (with their defaults) are declared here, next to the code they configure, and
registered with ``config.register_option_schema`` when this package is imported; each option's YAML
(conf/runtime/) lists its schema first, as the method group's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING
from torch import nn

from basis_sharing.config import register_option_schema
from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.distributed import AUTO, BACKENDS
from basis_sharing.runtime.sequential import BlockRunner

FULL, SEQUENTIAL = "full", "sequential"
HIDDEN_STATES = ("cpu", "device")  # where the hidden states wait between blocks


@dataclass
class RuntimeConfig:
    name: str = MISSING
    # The process group's backend under torchrun (runtime/distributed.py): auto (NCCL for a CUDA
    # run, Gloo otherwise), gloo or nccl. A single process has no process group.
    distributed_backend: str = AUTO


@dataclass
class FullRuntimeConfig(RuntimeConfig):
    """The whole model on the device."""


@dataclass
class SequentialRuntimeConfig(RuntimeConfig):
    """Weights on the CPU, one decoder block at a time on the device."""

    hidden_states: str = "cpu"  # where the hidden states wait between blocks: cpu | device

    @staticmethod
    def check(node: Any) -> None:
        if node.hidden_states not in HIDDEN_STATES:
            raise unknown_choice("runtime.hidden_states", node.hidden_states, HIDDEN_STATES)


RUNTIMES: dict[str, type[RuntimeConfig]] = {
    FULL: FullRuntimeConfig,
    SEQUENTIAL: SequentialRuntimeConfig,
}
for _name, _schema in RUNTIMES.items():
    register_option_schema("runtime", _name, _schema)


def check_runtime(runtime_cfg: Any, method: Any, sequential_methods: Sequence[str] = ()) -> None:
    """Refuse a runtime the method cannot use, or an unknown runtime or setting.

    Args:
        runtime_cfg: the ``runtime`` config node (``name``, and its option's settings).
        method: the run's ``CompressionMethod`` (its ``name`` and ``supports_sequential``).
        sequential_methods: names of the methods that do run block by block, suggested in the
            message (the caller reads them from the method registry).

    Raises:
        ConfigError: naming the method, why it cannot run block by block, and what to use.
    """
    name = runtime_cfg.name
    if name not in RUNTIMES:
        raise unknown_choice("runtime", name, list(RUNTIMES))
    backend = runtime_cfg.get("distributed_backend", AUTO)
    if backend not in BACKENDS:
        raise unknown_choice("runtime.distributed_backend", backend, BACKENDS)
    if name != SEQUENTIAL:
        return
    SequentialRuntimeConfig.check(runtime_cfg)
    if not method.supports_sequential:
        raise ConfigError(
            f"method={method.name} cannot run with runtime=sequential: it needs the whole model "
            "at once (a backward pass through every layer, or a search that scores the whole "
            "model), and runtime=sequential only ever has one decoder block on the device. Use "
            f"runtime=full for method={method.name}, or a method that runs block by block"
            + (f" ({', '.join(sorted(sequential_methods))})." if sequential_methods else ".")
        )


def weight_device(runtime_cfg: Any, device: torch.device | str) -> torch.device:
    """Where ``load_model`` should put the weights: the device (full), the CPU (sequential)."""
    return torch.device("cpu") if runtime_cfg.name == SEQUENTIAL else torch.device(device)


def hidden_device(runtime_cfg: Any, device: torch.device | str) -> torch.device:
    """Where the sequential runtime keeps the hidden states between blocks."""
    if runtime_cfg.name == SEQUENTIAL and runtime_cfg.hidden_states == "device":
        return torch.device(device)
    return torch.device("cpu")


def make_runner(
    runtime_cfg: Any, model: nn.Module, family: FamilyAdapter, device: torch.device | str
) -> BlockRunner | None:
    """The block runner of ``runtime=sequential`` on ``device``; None for ``runtime=full``."""
    if runtime_cfg.name != SEQUENTIAL:
        return None
    return BlockRunner(model, family, device, hidden_device(runtime_cfg, device))
