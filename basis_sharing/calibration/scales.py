"""Per-input-channel activation scales for ASVD (docs/methods.md §2.3).

ASVD scales W by D = diag(s^alpha) before the SVD, where s_j measures how large input channel j is
on the calibration set: ``abs_mean`` (ASVD-code's default) is the sum over calibration batches of
the per-batch mean over tokens of |x_j|, ``abs_max`` the largest |x_j| of any token. As for the
Grams (grams.py), a forward hook on one projection per distinct input folds every batch into
(d_in,) accumulators, so no activation is stored and q/k/v (up/gate) share one scale vector.

The abs_mean convention follows ASVD-code, whose calibration loader feeds one sample per batch: a
sum of batch means depends on the batch size (the overall factor does not matter to ASVD, which
divides it out again, but an uneven last batch weighs its tokens differently), so the batch size is
part of the cache key (``scales_key``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basis_sharing.calibration.cache import (
    Fields,
    StatsCacheError,
    Tensors,
    entry_tensors,
    load_or_collect_entry,
    stats_key,
    tensor_entries,
)
from basis_sharing.calibration.statistics import (
    Accumulator,
    ForwardStatistic,
    Key,
    collect_forward,
    register_statistic,
)
from basis_sharing.errors import unknown_choice
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.distributed import World
from basis_sharing.runtime.sequential import BlockRunner

log = logging.getLogger(__name__)

SCALES = "scales"  # the statistic's name in cache keys and files
SCALE_METHODS = ("abs_mean", "abs_max")


@dataclass
class ScaleStats:
    """ASVD's activation scales of one model: one (d_in,) vector per (layer, input) and method.

    Attributes:
        abs_mean: (layer, input) -> (d_in,) float64 CPU: sum over batches of the batch mean of |x|.
        abs_max: (layer, input) -> (d_in,) float64 CPU: max over all tokens of |x|.
        tokens: tokens every input saw.
        batches: calibration batches (forward passes) the abs_mean sum runs over.
    """

    abs_mean: dict[tuple[int, str], torch.Tensor]
    abs_max: dict[tuple[int, str], torch.Tensor]
    tokens: int
    batches: int

    def scale(self, layer: int, input: str, method: str = "abs_mean") -> torch.Tensor:
        """s: (d_in,) of ``input`` in decoder layer ``layer`` by ``method`` (abs_mean, abs_max)."""
        if method not in SCALE_METHODS:
            raise unknown_choice("ASVD activation scale method", method, SCALE_METHODS)
        table: dict[tuple[int, str], torch.Tensor] = getattr(self, method)
        try:
            return table[(layer, input)]
        except KeyError:
            raise KeyError(
                f"No {method} scale for layer {layer}, input '{input}'. Available inputs: "
                f"{sorted({name for _, name in table})}, layers: {sorted({i for i, _ in table})}."
            ) from None


class ScaleAccumulator:
    """Running per-channel sum of batch means of |x| and max of |x| of one activation stream.

    Both live in float64 on the device of the first batch; a batch's |x| is reduced where it is and
    only the (d_in,) results are kept.
    """

    def __init__(self) -> None:
        self.abs_mean: torch.Tensor | None = None  # (d_in,)
        self.abs_max: torch.Tensor | None = None  # (d_in,)
        self.tokens = 0
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold one batch ``x``: (..., d_in); every leading position is a token of this batch."""
        x = x.detach()
        if self.abs_mean is not None and x.device != self.abs_mean.device:
            x = x.to(self.abs_mean.device)  # e.g. a model split over devices, or a finished block
        magnitude = x.reshape(-1, x.shape[-1]).abs()  # (tokens, d_in), exact in any dtype
        batch_mean = magnitude.mean(dim=0, dtype=torch.float64)
        batch_max = magnitude.amax(dim=0).to(torch.float64)
        if self.abs_mean is None or self.abs_max is None:
            self.abs_mean, self.abs_max = batch_mean, batch_max
        elif batch_mean.shape != self.abs_mean.shape:
            raise ValueError(
                f"Activation width {batch_mean.shape[0]} does not match the scale's "
                f"{self.abs_mean.shape[0]}."
            )
        else:
            self.abs_mean += batch_mean
            torch.maximum(self.abs_max, batch_max, out=self.abs_max)
        self.tokens += magnitude.shape[0]
        self.batches += 1

    def to(self, device: torch.device | str) -> None:
        if self.abs_mean is not None and self.abs_max is not None:
            self.abs_mean, self.abs_max = self.abs_mean.to(device), self.abs_max.to(device)

    def reduce(self, world: World) -> None:
        """Sum the ranks' sums of batch means, max their maxima, add their counts.

        Exact because each rank's shard is whole batches of the single process's batching
        (``distributed.shard_bounds``): the sum runs over the very same batch means.
        """
        if self.abs_mean is None or self.abs_max is None:
            raise RuntimeError("a scale accumulator that saw no batch cannot be reduced")
        world.all_reduce_(self.abs_mean, "sum")
        world.all_reduce_(self.abs_max, "max")
        self.tokens, self.batches = world.sum_ints(self.tokens, self.batches)


@register_statistic
class ScaleStatistic(ForwardStatistic):
    """ASVD's abs_mean and abs_max per (layer, distinct input)."""

    name = "scale"
    stat = SCALES
    data_parallel = True  # sums of whole batches' means and a maximum

    def key(
        self, identity: dict[str, Any], calibration_hash: str, gram_dtype: str, batch_size: int
    ) -> str:
        return scales_key(identity, calibration_hash, batch_size)

    def accumulator(self, gram_dtype: str, store: str | None = None) -> Accumulator:
        return ScaleAccumulator()

    def assemble(
        self, accumulators: dict[Key, Accumulator], batches: int, gram_dtype: str
    ) -> ScaleStats:
        """The scales on the CPU as ordinary tensors; every input saw every batch."""
        counts = {key: (acc.tokens, acc.batches) for key, acc in accumulators.items()}
        if set(counts.values()) != {next(iter(counts.values()))} or any(
            acc.batches != batches or acc.abs_mean is None for acc in accumulators.values()
        ):
            raise RuntimeError(
                f"Hooked projections saw different (tokens, batches), expected {batches} "
                f"batches: {counts}."
            )
        # clone() outside inference mode turns inference tensors into ordinary ones.
        abs_mean = {key: acc.abs_mean.to("cpu").clone() for key, acc in accumulators.items()}
        abs_max = {key: acc.abs_max.to("cpu").clone() for key, acc in accumulators.items()}
        tokens = next(iter(counts.values()))[0]
        return ScaleStats(abs_mean=abs_mean, abs_max=abs_max, tokens=tokens, batches=batches)

    def encode(self, value: ScaleStats) -> tuple[Tensors, Fields]:
        return scales_to_tensors(value)

    def decode(self, tensors: Tensors, fields: Fields) -> ScaleStats:
        return scales_from_tensors(tensors, fields)

    def describe(self, value: ScaleStats) -> str:
        return (
            f"Collected activation scales of {len(value.abs_mean)} (layer, input) pairs over "
            f"{value.tokens} tokens in {value.batches} batches."
        )


SCALE = ScaleStatistic()


def collect_scales(
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    desc: str = "activation scales",
    runner: BlockRunner | None = None,
) -> ScaleStats:
    """ASVD's abs_mean and abs_max of every distinct projection input, in one forward pass.

    Args:
        model: the original (uncompressed) causal LM, on any device; put in eval mode for the pass.
        family: its adapter (where the layers and projections are, which input each reads).
        calibration_ids: (n_samples, seq_len) int64 token ids; every token counts.
        batch_size: samples per forward pass; abs_mean sums one mean per batch (module docstring).
        desc: progress-bar label.
        runner: run block by block with it; None: the whole model.

    Returns:
        ScaleStats: (d_in,) float64 CPU vectors per (layer, input); tokens = n_samples * seq_len.
    """
    stats = collect_forward(
        [SCALE], model, family, calibration_ids, batch_size, runner=runner, desc=desc
    )["scale"]
    log.info("%s", SCALE.describe(stats))
    return stats


# ---------------------------------------------------------------- cache


def scales_key(model_identity: dict[str, Any], calibration_hash: str, batch_size: int) -> str:
    """Cache key of ``collect_scales``' result (the batch size matters to abs_mean)."""
    return stats_key(
        model_identity, calibration_hash, "float64", stat=SCALES, params={"batch_size": batch_size}
    )


def scales_to_tensors(stats: ScaleStats) -> tuple[Tensors, Fields]:
    tensors = {
        **entry_tensors(stats.abs_mean, "abs_mean."),
        **entry_tensors(stats.abs_max, "abs_max."),
    }
    return tensors, {"tokens": stats.tokens, "batches": stats.batches}


def scales_from_tensors(tensors: Tensors, fields: Fields) -> ScaleStats:
    """Inverse of ``scales_to_tensors``, checking what only a scale file must satisfy."""
    abs_mean = tensor_entries(tensors, "abs_mean.")
    abs_max = tensor_entries(tensors, "abs_max.")
    if len(abs_mean) + len(abs_max) != len(tensors) or set(abs_mean) != set(abs_max):
        raise StatsCacheError("abs_mean and abs_max tensors do not pair up")
    for key, mean in abs_mean.items():
        if mean.ndim != 1 or mean.shape != abs_max[key].shape:
            raise StatsCacheError(f"scale {key} has shapes {mean.shape} / {abs_max[key].shape}")
        if mean.dtype != torch.float64 or abs_max[key].dtype != torch.float64:
            raise StatsCacheError(f"scale {key} is not float64")
    return ScaleStats(
        abs_mean=abs_mean,
        abs_max=abs_max,
        tokens=int(fields["tokens"]),
        batches=int(fields["batches"]),
    )


def load_or_collect_scales(
    cache_dir: Path,
    key: str,
    collect: Callable[[], ScaleStats],
    meta: dict[str, Any] | None = None,
) -> tuple[ScaleStats, bool]:
    """The cached scales for ``key`` (from ``scales_key``), or ``collect()``'s, written to disk."""
    return load_or_collect_entry(
        cache_dir, key, SCALES, collect, scales_to_tensors, scales_from_tensors, meta
    )
