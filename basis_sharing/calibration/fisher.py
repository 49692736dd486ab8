"""FWSVD's Fisher row importance (docs/methods.md §2.4; Hsu et al., ICLR 2022).

FWSVD weighs each row of W: (d_in, d_out) (an input feature, in the y = x W layout) by
sqrt(sum_b I_b), with the Fisher importance I_ab = sum_batches (dL/dW_ab)^2 of the causal LM loss on
the calibration set. Only the row sums are kept: per batch, one backward pass gives dL/dW for every
projection, whose square is summed over the output dimension into a (d_in,) float64 accumulator
and the gradient is dropped, so memory stays at one model's gradients (of the projections only) no
matter how many batches run. Unlike the Grams this is per projection kind, not per input: q, k and
v read the same input but have different gradients.

Like ASVD's abs_mean, the result depends on the batch size (the gradient is squared after the
batch mean of the loss), which is why the batch size is part of the cache key (``fisher_key``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

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
    BackwardStatistic,
    check_calibration_ids,
    input_device,
    register_statistic,
)
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.distributed import World

log = logging.getLogger(__name__)

FISHER = "fisher"  # the statistic's name in cache keys and files


@dataclass
class FisherStats:
    """FWSVD's Fisher row sums of one model: one (d_in,) vector per (layer, projection kind).

    Attributes:
        rows: (layer, kind) -> (d_in,) float64 CPU: sum over batches of (dL/dW)^2 summed over the
            output dimension of W: (d_in, d_out).
        batches: backward passes summed over.
        tokens: calibration tokens fed (n_samples * seq_len).
    """

    rows: dict[tuple[int, str], torch.Tensor]
    batches: int
    tokens: int

    def row(self, layer: int, kind: str) -> torch.Tensor:
        """sum_b I_ab: (d_in,) of projection ``kind`` in decoder layer ``layer``."""
        try:
            return self.rows[(layer, kind)]
        except KeyError:
            raise KeyError(
                f"No Fisher rows for layer {layer}, kind '{kind}'. Available kinds: "
                f"{sorted({k for _, k in self.rows})}, layers: {sorted({i for i, _ in self.rows})}."
            ) from None


def projection_weights(
    model: nn.Module, family: FamilyAdapter
) -> dict[tuple[int, str], tuple[nn.Parameter, str]]:
    """(layer, kind) -> (the stored weight parameter, its layout "linear" or "conv1d")."""
    return {
        (index, kind): (family.module(layer, kind).weight, family.projection(kind).layout)
        for index, layer in enumerate(family.layers(model))
        for kind in family.kinds
    }


def row_sum_of_squares(grad: torch.Tensor, layout: str) -> torch.Tensor:
    """sum over the output dimension of grad^2: (d_in,) float64.

    Args:
        grad: dL/dW as stored: (d_out, d_in) for nn.Linear, (d_in, d_out) for GPT-2 Conv1D.
        layout: "linear" or "conv1d" (``Projection.layout``).
    """
    output_dim = 1 if layout == "conv1d" else 0
    return grad.to(torch.float64).pow(2).sum(dim=output_dim)


@contextmanager
def _projection_grads_only(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Autograd tracks only ``weights``, in eval mode; everything is restored afterwards.

    Gradients of embeddings, norms and lm_head are never needed, so they are neither computed nor
    stored. Every parameter's ``requires_grad`` and ``.grad`` and every module's mode are put back
    as they were, also when the pass fails.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        model.eval()  # dropout would make the gradients random
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode


def _accumulate(
    rows: dict[tuple[int, str], torch.Tensor],
    weights: dict[tuple[int, str], tuple[nn.Parameter, str]],
) -> None:
    """Add this batch's squared gradients to ``rows`` and drop the gradients (zero for the next)."""
    for key, (weight, layout) in weights.items():
        if weight.grad is None:
            raise RuntimeError(f"Projection {key} got no gradient from the LM loss.")
        squared = row_sum_of_squares(weight.grad, layout)
        if key in rows:
            rows[key] += squared
        else:
            rows[key] = squared
        weight.grad = None


def collect_fisher(
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    desc: str = "fisher",
) -> FisherStats:
    """Fisher row sums of every projection of every decoder layer (one backward per batch).

    Args:
        model: the original (uncompressed) causal LM, on any device; run in eval mode, then its
            modes, ``requires_grad`` flags and ``.grad`` are restored.
        family: its adapter (where the layers and projections are, their weight layout).
        calibration_ids: (n_samples, seq_len) int64 token ids; the labels are the ids themselves.
        batch_size: samples per forward/backward pass (the result depends on it, see module doc).
        desc: progress-bar label.

    Returns:
        FisherStats: (d_in,) float64 CPU row sums per (layer, kind).
    """
    check_calibration_ids(calibration_ids, batch_size)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("collect_fisher needs autograd: call it outside torch.inference_mode().")
    weights = projection_weights(model, family)
    device = input_device(model)
    rows: dict[tuple[int, str], torch.Tensor] = {}
    batches = tokens = 0
    params = [weight for weight, _ in weights.values()]
    with _projection_grads_only(model, params), torch.enable_grad():
        starts = range(0, calibration_ids.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False):
            batch = calibration_ids[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            _accumulate(rows, weights)
            batches += 1
            tokens += batch.numel()
    stats = FisherStats(
        rows={key: row.to("cpu") for key, row in rows.items()}, batches=batches, tokens=tokens
    )
    log.info("%s", FISHER_ROWS.describe(stats))
    return stats


@register_statistic
class FisherStatistic(BackwardStatistic):
    """FWSVD's Fisher row sums per (layer, projection kind): one backward pass per batch."""

    name = "fisher"
    stat = FISHER
    # Sums over whole batches, and each rank's shard is whole batches of the single process's
    # batching (distributed.shard_bounds): the same per-batch squared gradients, summed.
    data_parallel = True

    def key(
        self, identity: dict[str, Any], calibration_hash: str, gram_dtype: str, batch_size: int
    ) -> str:
        return fisher_key(identity, calibration_hash, batch_size)

    def collect(
        self, model: nn.Module, family: FamilyAdapter, ids: torch.Tensor, batch_size: int
    ) -> FisherStats:
        return collect_fisher(model, family, ids, batch_size)

    def reduce(self, value: FisherStats, world: World) -> FisherStats:
        """The ranks' row sums summed, their batch and token counts added."""
        # The same model on every rank: the same keys in the same order.
        rows = {key: world.all_reduce_(row, "sum") for key, row in value.rows.items()}
        batches, tokens = world.sum_ints(value.batches, value.tokens)
        return FisherStats(rows=rows, batches=batches, tokens=tokens)

    def encode(self, value: FisherStats) -> tuple[Tensors, Fields]:
        return fisher_to_tensors(value)

    def decode(self, tensors: Tensors, fields: Fields) -> FisherStats:
        return fisher_from_tensors(tensors, fields)

    def describe(self, value: FisherStats) -> str:
        return (
            f"Collected Fisher rows of {len(value.rows)} projections over {value.tokens} tokens "
            f"in {value.batches} batches."
        )


FISHER_ROWS = FisherStatistic()


# ---------------------------------------------------------------- cache


def fisher_key(model_identity: dict[str, Any], calibration_hash: str, batch_size: int) -> str:
    """Cache key of ``collect_fisher``'s result (the batch size matters, see module docstring)."""
    return stats_key(
        model_identity, calibration_hash, "float64", stat=FISHER, params={"batch_size": batch_size}
    )


def fisher_to_tensors(stats: FisherStats) -> tuple[Tensors, Fields]:
    return entry_tensors(stats.rows), {"batches": stats.batches, "tokens": stats.tokens}


def fisher_from_tensors(tensors: Tensors, fields: Fields) -> FisherStats:
    """Inverse of ``fisher_to_tensors``, checking what only a Fisher file must satisfy."""
    rows = tensor_entries(tensors)
    for key, row in rows.items():
        if row.ndim != 1 or row.dtype != torch.float64:
            raise StatsCacheError(f"Fisher row {key} is {row.dtype} {tuple(row.shape)}")
    return FisherStats(rows=rows, batches=int(fields["batches"]), tokens=int(fields["tokens"]))


def load_or_collect_fisher(
    cache_dir: Path,
    key: str,
    collect: Callable[[], FisherStats],
    meta: dict[str, Any] | None = None,
) -> tuple[FisherStats, bool]:
    """The cached Fisher rows for ``key`` (from ``fisher_key``), or ``collect()``'s, on disk."""
    return load_or_collect_entry(
        cache_dir, key, FISHER, collect, fisher_to_tensors, fisher_from_tensors, meta
    )
