"""Streaming Gram matrices X^T X of the projection inputs (docs/methods.md §2.2).

Every whitening method needs, per decoder layer and per distinct projection input, the Gram
M_i = X_i^T X_i of the activations X_i: (tokens, d_in) that input saw on the calibration set; a
layer group uses M = sum_{i in G} M_i. Activations are never stored: a forward hook on one
projection per distinct input folds each batch into a (d_in, d_in) accumulator, so memory does not
grow with the number of calibration tokens. Projections reading the same activation (q/k/v, up/gate)
share one Gram, which is why only one of them is hooked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basis_sharing.calibration.cache import (
    ACCUMULATE_DTYPES,
    GRAMS,
    Fields,
    StatsCacheError,
    Tensors,
    accumulate_dtype_name,
    entry_tensors,
    load_or_collect_entry,
    read_entry,
    stats_key,
    tensor_entries,
    write_entry,
)
from basis_sharing.calibration.statistics import (
    Accumulator,
    ForwardStatistic,
    Key,
    collect_forward,
    register_statistic,
)
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.distributed import World
from basis_sharing.runtime.sequential import BlockRunner

log = logging.getLogger(__name__)

__all__ = [
    "ACCUMULATE_DTYPES",
    "GRAM_BLOCK_WIDTH",
    "GRAM_MAX_BLOCKS",
    "GramAccumulator",
    "GramStatistic",
    "GramStats",
    "accumulate_dtype_name",
    "collect_grams",
    "gram_block_entries",
    "gram_blocks",
    "hooked_kinds",
    "load_or_collect",
    "read_stats",
    "save_stats",
]


@dataclass
class GramStats:
    """The calibration statistics of one model: one Gram per (layer, input).

    Attributes:
        grams: (layer index, input name) -> X^T X: (d_in, d_in) on the CPU, in ``dtype``.
        tokens: tokens every input saw (all tokens count, there is no padding).
        dtype: accumulation dtype, "float32" or "float64".
    """

    grams: dict[tuple[int, str], torch.Tensor]
    tokens: int
    dtype: str

    def gram(self, layer: int, input: str) -> torch.Tensor:
        """X^T X: (d_in, d_in) of ``input`` in decoder layer ``layer``."""
        try:
            return self.grams[(layer, input)]
        except KeyError:
            raise KeyError(
                f"No Gram for layer {layer}, input '{input}'. Available inputs: "
                f"{sorted({name for _, name in self.grams})}, layers: "
                f"{sorted({i for i, _ in self.grams})}."
            ) from None

    def group_gram(self, layers: Sequence[int], input: str) -> torch.Tensor:
        """M = sum_{i in layers} X_i^T X_i: (d_in, d_in) in float64 (docs/methods.md §2.2).

        Summed in float64 because S is evaluated in FP64 and a group sums many fp32 Grams.
        """
        if not layers:
            raise ValueError("group_gram needs at least one layer.")
        total = self.gram(layers[0], input).to(torch.float64, copy=True)
        for layer in layers[1:]:
            total += self.gram(layer, input).to(torch.float64)
        return total


# The accumulator computes only the upper block triangle of X^T X (docs/methods.md §2.2): the
# columns are cut into at most GRAM_MAX_BLOCKS blocks of at least GRAM_BLOCK_WIDTH, and each batch
# adds one strip per block row, X_i^T [X_i ... X_b] -- (b + 1) / (2 b) of a full product's work
# (b = 8: 56 %). The lower blocks are mirrored from the upper ones when the Gram is read.
# Narrower blocks would save more multiplies but run the BLAS on thinner, slower panels.
GRAM_BLOCK_WIDTH = 192
GRAM_MAX_BLOCKS = 8


def gram_blocks(d: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of the blocks a width-``d`` Gram is accumulated in."""
    if d < 1:
        raise ValueError(f"a Gram needs a positive width, got {d}")
    width = max(GRAM_BLOCK_WIDTH, -(-d // GRAM_MAX_BLOCKS))
    return [(start, min(start + width, d)) for start in range(0, d, width)]


def gram_block_entries(d: int) -> int:
    """Entries of a width-``d`` Gram the blocks compute: each is one dot product per batch."""
    return sum((stop - start) * (d - start) for start, stop in gram_blocks(d))


class GramAccumulator:
    """Running X^T X of one activation stream, fed batch by batch.

    By default the Gram lives on the device of the first batch so the (tokens, d_in) x
    (tokens, d_in) product runs where the activations are; only the (d_in, d_in) result ever
    moves to the CPU. With ``store`` (``calibration.gram_device=cpu``) the running Gram lives
    there instead: each batch's product is still computed where the activations are, then added
    to it, so the device holds one batch's strip of products at a time and no layer's Gram.

    Only the upper block triangle is accumulated (``gram_blocks``); reading ``gram`` fills the
    lower blocks with its transpose first, so callers always see the whole symmetric matrix.
    Each upper entry is the same dot product over the same tokens as in a full product; only
    which half of the symmetric matrix is computed changes.
    """

    def __init__(
        self, dtype: torch.dtype | str = torch.float32, store: torch.device | str | None = None
    ) -> None:
        self.dtype = ACCUMULATE_DTYPES[accumulate_dtype_name(dtype)]
        self.store = None if store is None else torch.device(store)
        self._gram: torch.Tensor | None = None  # (d_in, d_in); lower blocks valid if _mirrored
        self._mirrored = True
        self.tokens = 0

    @property
    def gram(self) -> torch.Tensor | None:
        """X^T X: (d_in, d_in), symmetric; None before the first batch."""
        if self._gram is not None and not self._mirrored:
            # A Gram begun under inference mode can only be written in place under it.
            with torch.inference_mode(self._gram.is_inference()):
                for start, stop in gram_blocks(self._gram.shape[0])[:-1]:
                    self._gram[stop:, start:stop] = self._gram[start:stop, stop:].T
            self._mirrored = True
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._gram = value
        self._mirrored = True

    @property
    def device(self) -> torch.device | None:
        """Where the running Gram lives; None before the first batch."""
        return None if self._gram is None else self._gram.device

    def add(self, x: torch.Tensor) -> None:
        """Fold activations ``x``: (..., d_in) into the Gram; every leading position is a token."""
        x = x.detach()
        if self.store is None and self._gram is not None and x.device != self._gram.device:
            x = x.to(self._gram.device)  # e.g. a model split over devices, or a finished block
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)  # (tokens, d_in)
        if self._gram is None:
            d_in = flat.shape[1]
            where = flat.device if self.store is None else self.store
            self._gram = torch.zeros(d_in, d_in, dtype=self.dtype, device=where)
        elif flat.shape[1] != self._gram.shape[0]:
            raise ValueError(
                f"Activation width {flat.shape[1]} does not match the Gram's {self._gram.shape[0]}."
            )
        for start, stop in gram_blocks(flat.shape[1]):
            rows = flat[:, start:stop].T
            if self.store is None:
                self._gram[start:stop, start:].addmm_(rows, flat[:, start:])
            else:  # offloaded: this strip where the activations are, summed on the store
                self._gram[start:stop, start:] += (rows @ flat[:, start:]).to(self.store)
        self._mirrored = False
        self.tokens += flat.shape[0]

    def to(self, device: torch.device | str) -> None:
        if self._gram is not None:
            self._gram = self._gram.to(device)

    def reduce(self, world: World) -> None:
        """Sum the ranks' Grams and token counts: X^T X of the stacked X is the sum of blocks'."""
        gram = self.gram  # mirrored: every rank sums whole symmetric matrices
        if gram is None:
            raise RuntimeError("a Gram accumulator that saw no batch cannot be reduced")
        world.all_reduce_(gram, "sum")
        (self.tokens,) = world.sum_ints(self.tokens)


def hooked_kinds(family: FamilyAdapter) -> dict[str, str]:
    """input name -> the one projection kind whose input is captured for it (the first reader)."""
    return {name: kinds[0] for name, kinds in family.kinds_by_input().items()}


@register_statistic
class GramStatistic(ForwardStatistic):
    """X^T X per (layer, distinct input), in the run's Gram dtype."""

    name = "gram"
    stat = GRAMS
    data_parallel = True  # sums of x^T x

    def key(
        self, identity: dict[str, Any], calibration_hash: str, gram_dtype: str, batch_size: int
    ) -> str:
        return stats_key(identity, calibration_hash, gram_dtype)  # no batch size: sums of x^T x

    def accumulator(self, gram_dtype: str, store: str | None = None) -> Accumulator:
        return GramAccumulator(gram_dtype, store)

    def assemble(
        self, accumulators: dict[Key, Accumulator], batches: int, gram_dtype: str
    ) -> GramStats:
        """The Grams on the CPU as ordinary (non-inference) tensors, token counts checked."""
        counts = {key: acc.tokens for key, acc in accumulators.items()}
        if len(set(counts.values())) != 1 or any(acc.gram is None for acc in accumulators.values()):
            raise RuntimeError(f"Hooked projections saw different token counts: {counts}.")
        # clone() outside inference mode turns inference tensors into ordinary ones that callers
        # may update in place.
        grams = {key: acc.gram.to("cpu").clone() for key, acc in accumulators.items()}
        return GramStats(
            grams=grams, tokens=next(iter(counts.values())), dtype=accumulate_dtype_name(gram_dtype)
        )

    def encode(self, value: GramStats) -> tuple[Tensors, Fields]:
        return entry_tensors(value.grams), {"tokens": value.tokens, "dtype": value.dtype}

    def decode(self, tensors: Tensors, fields: Fields) -> GramStats:
        """Inverse of ``encode``: every Gram square and in the stored dtype."""
        dtype = accumulate_dtype_name(fields["dtype"])
        grams = tensor_entries(tensors)
        for (layer, name), gram in grams.items():
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
                raise StatsCacheError(
                    f"tensor L{layer}.{name} has non-square shape {tuple(gram.shape)}"
                )
            if str(gram.dtype).removeprefix("torch.") != dtype:
                raise StatsCacheError(
                    f"tensor L{layer}.{name} has dtype {gram.dtype}, metadata says {dtype}"
                )
        return GramStats(grams=grams, tokens=int(fields["tokens"]), dtype=dtype)

    def describe(self, value: GramStats) -> str:
        n_layers = len({i for i, _ in value.grams})
        return (
            f"Collected {len(value.grams)} Grams ({n_layers} layers x "
            f"{len(value.grams) // max(n_layers, 1)} inputs) over {value.tokens} tokens in "
            f"{value.dtype}."
        )


GRAM = GramStatistic()


def collect_grams(
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    accumulate_dtype: torch.dtype | str = torch.float32,
    desc: str = "calibration",
    runner: BlockRunner | None = None,
) -> GramStats:
    """X^T X of every distinct projection input of every decoder layer, in one forward pass.

    Args:
        model: the causal LM, on any device; put in eval mode for the pass.
        family: its adapter (where the layers and projections are, which input each reads).
        calibration_ids: (n_samples, seq_len) int64 token ids; every token counts.
        batch_size: samples per forward pass (does not change the result beyond rounding).
        accumulate_dtype: float32 (the reference) or float64.
        desc: progress-bar label.
        runner: run block by block with it (``runtime=sequential``); None: the whole model.

    Returns:
        GramStats: one (d_in, d_in) CPU Gram per (layer, input); tokens = n_samples * seq_len.
    """
    dtype = accumulate_dtype_name(accumulate_dtype)
    stats = collect_forward(
        [GRAM], model, family, calibration_ids, batch_size, dtype, runner, desc
    )["gram"]
    log.info("%s", GRAM.describe(stats))
    return stats


# ---------------------------------------------------------------- cache (the Gram statistic)


def save_stats(path: Path, stats: GramStats, key: str, meta: dict[str, Any] | None = None) -> None:
    """Write ``stats`` to ``path`` atomically: readers see the old file or the complete new one."""
    write_entry(path, key, GRAMS, *GRAM.encode(stats), meta)


def read_stats(path: Path, key: str) -> GramStats:
    """Load and verify a Gram cache file.

    Raises:
        StatsCacheError: the file does not parse, belongs to another key, format or statistic,
            lacks a listed tensor, holds a non-square or non-finite one, or its bytes do not match
            the checksum.
    """
    tensors, fields = read_entry(path, key, GRAMS)
    try:
        return GRAM.decode(tensors, fields)
    except StatsCacheError:
        raise
    except Exception as exc:
        raise StatsCacheError(f"invalid {GRAMS} ({type(exc).__name__}: {exc})") from exc


def load_or_collect(
    cache_dir: Path,
    key: str,
    collect,
    meta: dict[str, Any] | None = None,
) -> tuple[GramStats, bool]:
    """The cached Grams for ``key``, or ``collect()``'s, written to the cache.

    Returns:
        (statistics, True on a cache hit).
    """
    return load_or_collect_entry(cache_dir, key, GRAMS, collect, GRAM.encode, GRAM.decode, meta)
