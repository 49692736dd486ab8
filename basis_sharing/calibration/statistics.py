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

Data-parallel (``torchrun``, a ``World`` of several ranks, runtime/distributed.py): each rank runs
the passes over its shard of the calibration batches, then the partial results are reduced across
the ranks (each accumulator's ``reduce``, a backward statistic's ``reduce``) before ``assemble``,
so every rank holds the statistic of all samples. Only a statistic that says it reduces exactly
(``data_parallel``) is computed this way; rank 0 decides what the cache holds and is the only one
to write it.
"""

from __future__ import annotations

import contextlib
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
from basis_sharing.runtime.distributed import SINGLE, World
from basis_sharing.runtime.sequential import BlockRunner, token_batches

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (decoder layer index, stream name: an input or a projection kind)


class Accumulator(Protocol):
    """Folds one activation stream, batch by batch, into a fixed-size summary."""

    tokens: int

    def add(self, x: torch.Tensor) -> None: ...

    def to(self, device: torch.device | str) -> None: ...

    def reduce(self, world: World) -> None:
        """Combine, in place, this rank's state with the other ranks' (collectives of ``world``).

        Afterwards it holds what one process fed every rank's batches would hold (sums summed,
        maxima maxed, rows concatenated in rank order, counts added). Every rank calls it on its
        accumulators in the same order.
        """
        ...


class Statistic(ABC):
    """One calibration statistic (see the module docstring).

    Attributes:
        name: what methods ask for (``CompressionMethod.stats_needed``): "gram", "scale", ...
        stat: its name in cache keys and files ("grams", "scales", "fisher").
        backward: whether it needs the loss's gradients (its own pass, the whole model at once).
        data_parallel: whether the ranks' partial results reduce exactly to the single-process
            value (its accumulators', or its own, ``reduce``); only then may it run under torchrun.
    """

    name: ClassVar[str]
    stat: ClassVar[str]
    backward: ClassVar[bool] = False
    data_parallel: ClassVar[bool] = False

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
    def accumulator(self, gram_dtype: str, store: str | None = None) -> Accumulator:
        """A fresh accumulator for one (layer, stream).

        ``store``: where a large running state lives ("cpu": ``calibration.gram_device=cpu``; None:
        where the first batch arrives). Small states may ignore it.
        """

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

    def reduce(self, value: Any, world: World) -> Any:
        """This rank's ``value`` combined with the other ranks' (only if ``data_parallel``)."""
        raise NotImplementedError(f"statistic '{self.name}' cannot be reduced across ranks")


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


def check_data_parallel(statistics: Iterable[Statistic], world: World) -> None:
    """Refuse, before any pass, a statistic that cannot be computed over several ranks.

    Raises:
        ConfigError: naming the statistics whose partial results do not reduce exactly.
    """
    if world.size == 1:
        return
    refused = sorted(s.name for s in statistics if not s.data_parallel)
    if refused:
        able = sorted(name for name, s in STATISTICS.items() if s.data_parallel)
        raise ConfigError(
            f"calibration statistic(s) {', '.join(refused)} cannot be computed data-parallel: "
            f"their per-rank results do not reduce exactly to the single-process ones. Run "
            f"this method in one process (without torchrun); the statistics that can: "
            f"{', '.join(able)}."
        )


def check_same_calibration(calibration_hash: str, world: World) -> None:
    """Every rank must calibrate on the same token ids (the same data, sampler and tokenizer).

    Raises:
        CalibrationError: on every rank, naming the ranks whose ids differ from rank 0's.
    """
    hashes = world.all_gather_object(calibration_hash)
    different = [rank for rank, value in enumerate(hashes) if value != hashes[0]]
    if different:
        raise CalibrationError(
            f"rank(s) {different} sampled other calibration token ids than rank 0 (hashes "
            f"{sorted(set(hashes))}): every process must read the same data mirror and "
            "tokenizer with the same calibration settings."
        )


def reduce_accumulators(accumulators: Iterable[Accumulator], world: World) -> None:
    """Every accumulator reduced across the ranks, in the same order on every rank.

    Inference mode: accumulators filled under it hold inference tensors, updated in place here.
    """
    with torch.inference_mode():
        for acc in accumulators:
            acc.reduce(world)


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids must go: the embedding's device (the first device of a split model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


class _Taps:
    """The accumulators of some forward statistics on some layers, and the hooks feeding them."""

    def __init__(
        self,
        statistics: Sequence[ForwardStatistic],
        family: FamilyAdapter,
        gram_dtype: str,
        store: str | None = None,
    ) -> None:
        self.statistics = list(statistics)
        self.family = family
        self.gram_dtype = gram_dtype
        self.store = store
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
                        acc = statistic.accumulator(self.gram_dtype, self.store)
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

    def accumulators(self) -> list[Accumulator]:
        """Every accumulator, in creation order (the same on every rank)."""
        return [acc for filled in self.filled.values() for acc in filled.values()]

    def assemble(self, batches: int) -> dict[str, Any]:
        return {
            s.name: s.assemble(self.filled[s.name], batches, self.gram_dtype)
            for s in self.statistics
        }


# CPU flags (Linux /proc/cpuinfo) with which a low-precision matmul runs natively; without them
# oneDNN falls back to a conversion path that is much slower than float32 (measured on an
# AVX2-only AMD EPYC: 1.0 GFLOP/s bf16 against 103-126 float32, README "Calibration").
NATIVE_CPU_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 AVX-512 / AMX; aarch64 "bf16"
    "float16": ("avx512_fp16", "amx_fp16", "fphp"),
}
CPUINFO = Path("/proc/cpuinfo")


def cpu_runs_natively(dtype: str, cpuinfo: Path | None = None) -> bool | None:
    """Whether this CPU multiplies ``dtype`` in hardware; None where its flags cannot be read."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return any(flag in flags for flag in NATIVE_CPU_FLAGS.get(dtype, ()))


def check_forward_device(device: torch.device, dtype: str | None) -> bool | None:
    """Warn when ``calibration.forward_dtype`` would be emulated on this CPU; returns whether it
    runs natively (None: not a CPU low-precision forward, or the flags are unknown)."""
    if dtype is None or device.type != "cpu":
        return None
    native = cpu_runs_natively(dtype)
    if native is False:
        log.warning(
            "calibration.forward_dtype=%s on a CPU without %s instructions (%s): the matmuls "
            "are emulated and much slower than float32; leave forward_dtype unset here.",
            dtype,
            dtype,
            " / ".join(NATIVE_CPU_FLAGS[dtype]),
        )
    return native


def forward_autocast(
    device: torch.device, dtype: str | None, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """A statistics pass's forward under ``calibration.forward_dtype`` (``dtype``, a torch dtype
    name; None: the model's own, autocast off). The accumulators switch autocast off for
    themselves (``_feed``). ``cache_enabled=False`` for passes that change weights between calls:
    a cached low-precision copy of a weight would outlive the change."""
    return torch.autocast(
        device.type,
        getattr(torch, dtype or "float32"),
        enabled=dtype is not None,
        cache_enabled=cache_enabled,
    )


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
    world: World | None = None,
    gram_store: str | None = None,
) -> dict[str, Any]:
    """Every forward statistic of ``statistics`` in one pass over the calibration batches.

    Args:
        model: the causal LM, on any device (put in eval mode for the pass).
        calibration_ids: (n_samples, seq_len) int64 token ids; every token counts.
        batch_size: samples per forward pass.
        gram_dtype: accumulation dtype of the Grams ("float32" or "float64").
        runner: run block by block with it (``runtime=sequential``); None: the whole model.
        world: the ranks of a data-parallel run: this rank passes its shard of the batches, then
            the accumulators are reduced across the ranks. None: one process, all batches.
        gram_store: "cpu": the Grams accumulate on the CPU (``calibration.gram_device=cpu``); None:
            on the device of the activations.

    Returns:
        statistic name -> its value (of all samples, on every rank), every tensor on the CPU.

    Raises:
        ConfigError: with several ranks, a statistic that is not ``data_parallel``, or fewer
            batches than ranks.
    """
    check_calibration_ids(calibration_ids, batch_size)
    world = SINGLE if world is None else world
    check_data_parallel(statistics, world)
    batches = -(-calibration_ids.shape[0] // batch_size)
    ids = world.shard(calibration_ids, batch_size)  # all of them for one process
    taps = _Taps(statistics, family, gram_dtype, gram_store)
    if runner is None:
        _, handles = taps.attach(enumerate(family.layers(model)))
        run_hooked(model, ids, batch_size, desc, handles)
    else:
        with runner.open(token_batches(ids, batch_size), desc) as session:
            for block in session.blocks():
                made, handles = taps.attach(zip(block.layers, block.modules, strict=True))
                try:
                    block.run(keep_outputs=True)
                finally:
                    remove_hooks(handles)
                for acc in made:  # the device holds one block's statistics at a time
                    acc.to("cpu")
    if world.size > 1:
        reduce_accumulators(taps.accumulators(), world)
    return taps.assemble(batches)


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
    world: World | None = None,
    gram_store: str | None = None,
) -> dict[str, Collected]:
    """The statistics ``names``, each from the disk cache when this setup ran before.

    The missing forward statistics are computed together in one hooked pass (block by block with
    ``runner``), each backward one in its own pass; every computed one is cached.

    With a ``world`` of several ranks, rank 0 alone reads the cache and tells the others which
    statistics are missing; those are computed by all ranks together (each on its shard, then
    reduced) and cached by rank 0. On the other ranks a statistic rank 0 found in its cache has
    the value None: they only take part in computing the missing ones.

    Args:
        names: registered statistic names ("gram", "scale", "fisher").
        identity: JSON-able identity of the weights (part of every key).
        calibration_hash: sha256 of ``calibration_ids`` (part of every key).
        cache_dir: cache root; files are ``<cache_dir>/stats/<key>.safetensors``.
        meta: JSON-able provenance stored beside the tensors (not part of the key).
        world: the ranks of a data-parallel run; None: one process.
        gram_store: where the Grams accumulate ("cpu", or None: the device; ``collect_forward``).

    Raises:
        ConfigError: a backward statistic asked for with a runner (it needs the whole model), or
            with several ranks, one that is not ``data_parallel``.
        CalibrationError: with several ranks, ranks whose calibration ids differ.
    """
    check_calibration_ids(calibration_ids, batch_size)
    world = SINGLE if world is None else world
    wanted = [get_statistic(name) for name in dict.fromkeys(names)]
    if runner is not None:
        for statistic in wanted:
            if statistic.backward:
                raise ConfigError(
                    f"calibration statistic '{statistic.name}' needs a backward pass through the "
                    "whole model, which runtime=sequential cannot run; use runtime=full."
                )
    check_data_parallel(wanted, world)
    if world.size > 1:
        check_same_calibration(calibration_hash, world)
    found: dict[str, Collected] = {}
    missing: list[Statistic] = []
    if world.is_main:
        for statistic in wanted:
            key = statistic.key(identity, calibration_hash, gram_dtype, batch_size)
            value = lookup(cache_dir, key, statistic.stat, statistic.decode)
            if value is None:
                missing.append(statistic)
            else:
                found[statistic.name] = Collected(key, value, True)
    missing_names = world.broadcast_object([s.name for s in missing])  # rank 0's decision
    if not world.is_main:
        missing = [s for s in wanted if s.name in missing_names]
        for statistic in wanted:
            if statistic.name not in missing_names:
                key = statistic.key(identity, calibration_hash, gram_dtype, batch_size)
                found[statistic.name] = Collected(key, None, True)
    computed: dict[str, Any] = {}
    forward = [s for s in missing if isinstance(s, ForwardStatistic)]
    if forward:
        args = (forward, model, family, calibration_ids, batch_size, gram_dtype, runner)
        computed.update(collect_forward(*args, world=world, gram_store=gram_store))
    for statistic in missing:
        if isinstance(statistic, BackwardStatistic):
            ids = world.shard(calibration_ids, batch_size)
            value = statistic.collect(model, family, ids, batch_size)
            computed[statistic.name] = value if world.size == 1 else statistic.reduce(value, world)
    for statistic in missing:
        value = computed[statistic.name]
        if not statistic.backward:  # a backward statistic's own pass logs it
            log.info("%s", statistic.describe(value))
        key = statistic.key(identity, calibration_hash, gram_dtype, batch_size)
        if world.is_main:  # one writer: the ranks' values are the same
            store(cache_dir, key, statistic.stat, *statistic.encode(value), meta)
        found[statistic.name] = Collected(key, value, False)
    return {statistic.name: found[statistic.name] for statistic in wanted}
