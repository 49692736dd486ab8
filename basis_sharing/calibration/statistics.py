"""Every calibration statistic behind one registry, cached on disk, filled by shared passes.

A statistic (docs/methods.md §2.2-§2.4) is a small class registered under the name methods ask
for in ``stats_needed``: it says how its cache key is built, how it is written to and read from
the cache (``encode`` / ``decode``, the one format of ``cache.py``), and how it is computed:

- a ``ForwardStatistic`` (the Grams, ASVD's activation scales) reads projection inputs: it names
  the input streams it taps and makes one streaming accumulator per (layer, stream). One hooked
  forward pass fills every forward statistic asked for at once: one hook per tapped projection
  feeds each accumulator the same activations, which are never stored. With a ``BlockRunner``
  (``runtime=sequential``) the pass runs block by block and each block's accumulators leave the
  device with the block; the numbers are the same, accumulated in the same order.
- a ``BackwardStatistic`` (FWSVD's Fisher rows) needs gradients of the LM loss through the whole
  model, so it runs its own pass and cannot run block by block.

``collect_statistics`` is the entry point: the cached ones are read (a damaged file is recomputed
with a warning), the missing ones computed, with the fewest passes, and cached.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.calibration.cache import Fields, Tensors, lookup, store
from basis_sharing.errors import CalibrationError, ConfigError, unknown_choice
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.sequential import BlockRunner, token_batches

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (decoder layer index, stream name: an input or a projection kind)


class Accumulator(Protocol):
    """Folds one activation stream, batch by batch, into a fixed-size summary."""

    tokens: int

    def add(self, x: torch.Tensor) -> None: ...

    def to(self, device: torch.device | str) -> None: ...


class Statistic(ABC):
    """One calibration statistic (see the module docstring).

    Attributes:
        name: what methods ask for (``CompressionMethod.stats_needed``): "gram", "scale", ...
        stat: its name in cache keys and files ("grams", "scales", "fisher").
        backward: whether it needs the loss's gradients (its own pass, the whole model at once).
    """

    name: ClassVar[str]
    stat: ClassVar[str]
    backward: ClassVar[bool] = False

    @abstractmethod
    def key(
        self, identity: dict[str, Any], calibration_hash: str, gram_dtype: str, batch_size: int
    ) -> str:
        """Its cache key (from ``cache.stats_key``)."""

    @abstractmethod
    def encode(self, value: Any) -> tuple[Tensors, Fields]:
        """The value as named tensors plus JSON scalars (the cache format)."""

    @abstractmethod
    def decode(self, tensors: Tensors, fields: Fields) -> Any:
        """Inverse of ``encode``; raises on anything only this statistic can check."""

    def describe(self, value: Any) -> str:
        """One log line about a collected value."""
        return f"Collected {self.name} statistics."


class ForwardStatistic(Statistic):
    """A statistic of projection inputs, filled by hooks during a forward pass."""

    def streams(self, family: FamilyAdapter) -> dict[str, str]:
        """stream name -> the projection kind whose input it reads.

        Default: one stream per distinct input, read at its first reader (q/k/v share the
        attention input, so one hook serves all three).
        """
        return {name: kinds[0] for name, kinds in family.kinds_by_input().items()}

    @abstractmethod
    def accumulator(self, gram_dtype: str) -> Accumulator:
        """A fresh accumulator for one (layer, stream)."""

    @abstractmethod
    def assemble(self, accumulators: dict[Key, Accumulator], batches: int, gram_dtype: str) -> Any:
        """The statistic from every (layer, stream)'s filled accumulator (moved to the CPU)."""


class BackwardStatistic(Statistic):
    """A statistic that needs a backward pass of the whole model."""

    backward = True

    @abstractmethod
    def collect(
        self, model: nn.Module, family: FamilyAdapter, ids: torch.Tensor, batch_size: int
    ) -> Any:
        """Compute it over the calibration batches."""


STATISTICS: dict[str, Statistic] = {}


def register_statistic(cls: type[Statistic]) -> type[Statistic]:
    """Class decorator: make ``cls.name`` a statistic methods can ask for."""
    if cls.name in STATISTICS:
        raise ValueError(f"statistic '{cls.name}' registered twice")
    STATISTICS[cls.name] = cls()
    return cls


def get_statistic(name: str) -> Statistic:
    if name not in STATISTICS:
        raise unknown_choice("calibration statistic", name, list(STATISTICS))
    return STATISTICS[name]


# ---------------------------------------------------------------- the forward pass


def check_calibration_ids(calibration_ids: torch.Tensor, batch_size: int) -> None:
    """The input checks every calibration statistic makes.

    Raises:
        CalibrationError: ids are not a non-empty (n_samples, seq_len) tensor.
        ConfigError: batch_size < 1.
    """
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0:
        raise CalibrationError(
            "Calibration ids must be a non-empty (n_samples, seq_len) tensor, got shape "
            f"{tuple(calibration_ids.shape)}."
        )
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size}.")


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids must go: the embedding's device (the first device of a split model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


class _Taps:
    """The accumulators of some forward statistics on some layers, and the hooks feeding them."""

    def __init__(
        self, statistics: Sequence[ForwardStatistic], family: FamilyAdapter, gram_dtype: str
    ) -> None:
        self.statistics = list(statistics)
        self.family = family
        self.gram_dtype = gram_dtype
        self.filled: dict[str, dict[Key, Accumulator]] = {s.name: {} for s in statistics}

    def attach(
        self, layers: Iterable[tuple[int, nn.Module]]
    ) -> tuple[list[Accumulator], list[torch.utils.hooks.RemovableHandle]]:
        """One hook per tapped projection of ``layers`` ((index, layer) pairs)."""
        made: list[Accumulator] = []
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for index, layer in layers:
                by_kind: dict[str, list[Accumulator]] = {}
                for statistic in self.statistics:
                    for stream, kind in statistic.streams(self.family).items():
                        acc = statistic.accumulator(self.gram_dtype)
                        self.filled[statistic.name][(index, stream)] = acc
                        by_kind.setdefault(kind, []).append(acc)
                        made.append(acc)
                for kind, accs in by_kind.items():
                    module = self.family.module(layer, kind)
                    handles.append(module.register_forward_hook(_feed(accs), with_kwargs=True))
        except BaseException:
            remove_hooks(handles)
            raise
        return made, handles

    def assemble(self, batches: int) -> dict[str, Any]:
        return {
            s.name: s.assemble(self.filled[s.name], batches, self.gram_dtype)
            for s in self.statistics
        }


def _feed(accumulators: list[Accumulator]):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        # Linear and GPT-2 Conv1D both take the activation as their first argument.
        x = args[0] if args else next(iter(kwargs.values()))
        # Under calibration.forward_dtype's autocast the accumulation stays in its own dtype.
        with torch.autocast(x.device.type, enabled=False):
            for acc in accumulators:
                acc.add(x)

    return hook


def remove_hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def run_hooked(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    batch_size: int,
    desc: str,
    handles: list[torch.utils.hooks.RemovableHandle],
) -> None:
    """One inference pass of the whole model with ``handles`` attached.

    The model is in eval mode for the pass (dropout would make the statistics random); the hooks
    are removed and the mode restored whatever happens.
    """
    was_training = model.training
    model.eval()
    try:
        device = input_device(model)
        starts = range(0, calibration_ids.shape[0], batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc=desc, unit="batch", leave=False):
                batch = calibration_ids[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
    finally:
        remove_hooks(handles)
        if was_training:
            model.train()


def collect_forward(
    statistics: Sequence[ForwardStatistic],
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    gram_dtype: str = "float32",
    runner: BlockRunner | None = None,
    desc: str = "calibration",
) -> dict[str, Any]:
    """Every forward statistic of ``statistics`` in one pass over the calibration batches.

    Args:
        model: the causal LM, on any device (put in eval mode for the pass).
        calibration_ids: (n_samples, seq_len) int64 token ids; every token counts.
        batch_size: samples per forward pass.
        gram_dtype: accumulation dtype of the Grams ("float32" or "float64").
        runner: run block by block with it (``runtime=sequential``); None: the whole model.

    Returns:
        statistic name -> its value, every tensor on the CPU.
    """
    check_calibration_ids(calibration_ids, batch_size)
    taps = _Taps(statistics, family, gram_dtype)
    if runner is None:
        _, handles = taps.attach(enumerate(family.layers(model)))
        run_hooked(model, calibration_ids, batch_size, desc, handles)
    else:
        with runner.open(token_batches(calibration_ids, batch_size), desc) as session:
            for block in session.blocks():
                made, handles = taps.attach(zip(block.layers, block.modules, strict=True))
                try:
                    block.run(keep_outputs=True)
                finally:
                    remove_hooks(handles)
                for acc in made:  # the device holds one block's statistics at a time
                    acc.to("cpu")
    return taps.assemble(-(-calibration_ids.shape[0] // batch_size))


# ---------------------------------------------------------------- the entry point


@dataclass
class Collected:
    """One statistic of a run: its cache key, its value, whether it came from the cache."""

    key: str
    value: Any
    cache_hit: bool


def collect_statistics(
    names: Iterable[str],
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    gram_dtype: str,
    identity: dict[str, Any],
    calibration_hash: str,
    cache_dir: Path,
    meta: dict[str, Any] | None = None,
    runner: BlockRunner | None = None,
) -> dict[str, Collected]:
    """The statistics ``names``, each from the disk cache when this setup ran before.

    The missing forward statistics are computed together in one hooked pass (block by block with
    ``runner``), each backward one in its own pass; every computed one is cached.

    Args:
        names: registered statistic names ("gram", "scale", "fisher").
        identity: JSON-able identity of the weights (part of every key).
        calibration_hash: sha256 of ``calibration_ids`` (part of every key).
        cache_dir: cache root; files are ``<cache_dir>/stats/<key>.safetensors``.
        meta: JSON-able provenance stored beside the tensors (not part of the key).

    Raises:
        ConfigError: a backward statistic asked for with a runner (it needs the whole model).
    """
    check_calibration_ids(calibration_ids, batch_size)
    wanted = [get_statistic(name) for name in dict.fromkeys(names)]
    if runner is not None:
        for statistic in wanted:
            if statistic.backward:
                raise ConfigError(
                    f"calibration statistic '{statistic.name}' needs a backward pass through the "
                    "whole model, which runtime=sequential cannot run; use runtime=full."
                )
    found: dict[str, Collected] = {}
    missing: list[Statistic] = []
    for statistic in wanted:
        key = statistic.key(identity, calibration_hash, gram_dtype, batch_size)
        value = lookup(cache_dir, key, statistic.stat, statistic.decode)
        if value is None:
            missing.append(statistic)
        else:
            found[statistic.name] = Collected(key, value, True)
    computed: dict[str, Any] = {}
    forward = [s for s in missing if isinstance(s, ForwardStatistic)]
    if forward:
        computed.update(
            collect_forward(forward, model, family, calibration_ids, batch_size, gram_dtype, runner)
        )
    for statistic in missing:
        if isinstance(statistic, BackwardStatistic):
            computed[statistic.name] = statistic.collect(model, family, calibration_ids, batch_size)
    for statistic in missing:
        value = computed[statistic.name]
        if not statistic.backward:  # a backward statistic's own pass logs it
            log.info("%s", statistic.describe(value))
        key = statistic.key(identity, calibration_hash, gram_dtype, batch_size)
        store(cache_dir, key, statistic.stat, *statistic.encode(value), meta)
        found[statistic.name] = Collected(key, value, False)
    return {statistic.name: found[statistic.name] for statistic in wanted}
