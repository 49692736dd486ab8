"""``model.calib_batch_size=auto``: the calibration batch size that fills the device
(docs/methods.md §2.5).

The hooked calibration pass runs under inference mode, so its memory is what stays resident
(the weights, already on the device when this is decided, and the Gram accumulators) plus, per
sample in a batch, the activations of one decoder layer in flight and the logits. The size chosen
is

    batch = floor((fraction * free - resident) / per_sample),  clamped to [1, samples per rank],

from the device's free memory (``torch.cuda.mem_get_info`` on a GPU, the available RAM on the
CPU), an estimate of what becomes resident (``resident_bytes``) and an upper estimate of one
sample's working set (``sample_bytes``), both from the model's shapes: no trial pass is run.
``fraction`` leaves room for what the estimate does not count (the allocator's fragmentation,
other processes).

Under ``torchrun`` every rank decides for its own device and the ranks take the smallest choice,
so the batches are the same on every rank (``distributed.shard_bounds`` deals whole batches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from basis_sharing.calibration.cache import ACCUMULATE_DTYPES, accumulate_dtype_name
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.distributed import SINGLE, World


@dataclass(frozen=True)
class Footprint:
    """The byte counts the choice is made from (recorded with it)."""

    free: int  # the device's free memory when deciding
    resident: int  # what the pass keeps on the device whatever the batch (Grams, a block)
    per_sample: int  # one sample's working set (upper estimate)
    fraction: float  # of ``free`` the pass may use


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    footprint: Footprint
    limit: int  # the most that can be useful: the samples of one rank

    def summary(self) -> dict[str, Any]:
        """JSON-able, for the record's ``calibration.batch``."""
        return {"batch_size": self.batch_size, "limit": self.limit, **asdict(self.footprint)}


def fit_batch_size(footprint: Footprint, limit: int) -> int:
    """floor((fraction * free - resident) / per_sample) clamped to [1, ``limit``].

    At least one sample always: when not even one fits, the pass is tried at batch 1 (the
    estimate is an upper one) rather than refused here.
    """
    if limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    room = int(footprint.fraction * footprint.free) - footprint.resident
    fits = room // max(footprint.per_sample, 1)
    return int(min(max(fits, 1), limit))


def _widths(model: nn.Module, family: FamilyAdapter) -> tuple[dict[str, int], dict[str, int]]:
    """(input name -> d_in, kind -> d_out) of the first decoder layer."""
    layer = family.layers(model)[0]
    inputs, outputs = {}, {}
    for p in family.projections:
        d_in, d_out = family.shape(layer, p.kind)
        inputs[p.input], outputs[p.kind] = d_in, d_out
    return inputs, outputs


def _heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def _element_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


def sample_bytes(
    model: nn.Module, family: FamilyAdapter, seq_len: int, gram_dtype: str, forward_bytes: int = 0
) -> int:
    """Upper estimate of one sample's bytes in the hooked pass (inference mode).

    One decoder layer's activations in flight, all counted as if alive at once: the residual
    stream and its normalised copies (3 T d), every distinct projection input and every
    projection output, the attention scores and their softmax (2 h T^2, as if materialised), the
    hooks' copy of the widest input in the Gram dtype, and the logits (T V, plus a float32 copy).
    ``forward_bytes``: the activations' element size (0: the weights').
    """
    act = forward_bytes or _element_bytes(model)
    gram = ACCUMULATE_DTYPES[accumulate_dtype_name(gram_dtype)].itemsize
    inputs, outputs = _widths(model, family)
    hidden = max(inputs.values())  # the widest input (the MLP's hidden one)
    d_model = min(inputs.values())
    t = seq_len
    layer = act * t * (3 * d_model + sum(inputs.values()) + sum(outputs.values()))
    scores = act * 2 * _heads(model) * t * t
    hook = gram * t * hidden
    logits = (act + 4) * t * _vocab(model)
    return int(layer + scores + hook + logits)


def gram_bytes(model: nn.Module, family: FamilyAdapter, gram_dtype: str) -> tuple[int, int]:
    """(every layer's Grams, one layer's) in bytes: sum over the distinct inputs of d_in^2."""
    gram = ACCUMULATE_DTYPES[accumulate_dtype_name(gram_dtype)].itemsize
    inputs, _ = _widths(model, family)
    per_layer = gram * sum(d * d for d in inputs.values())
    return per_layer * len(family.layers(model)), per_layer


def block_bytes(model: nn.Module, family: FamilyAdapter) -> int:
    """The largest decoder layer's parameters and buffers, in bytes."""
    sizes = [
        sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
        for layer in family.layers(model)
    ]
    return max(sizes, default=0)


# Allocated by the first pass whatever the batch: kernels' code pages, thread pools' buffers, the
# allocator's arenas. Measured 0.7 GiB on the CPU with the embedded model
# (scripts/bench_batch_estimate.py); reserved on every device.
RESERVE_BYTES = 2**30


def resident_bytes(
    model: nn.Module,
    family: FamilyAdapter,
    gram_dtype: str,
    sequential: bool,
    gram_device: str = "device",
) -> int:
    """What the pass holds on the device besides the batch's activations.

    ``runtime=full``: every layer's Grams (none with ``gram_device=cpu``: only one product per
    input in flight); the weights are already on the device. ``runtime=sequential``: one block's
    weights and its Grams (the hidden states wait on the CPU; with ``hidden_states=device`` the
    caller adds them). Both: ``RESERVE_BYTES``.
    """
    every, one = gram_bytes(model, family, gram_dtype)
    grams = one if gram_device == "cpu" or sequential else every
    return RESERVE_BYTES + grams + (block_bytes(model, family) if sequential else 0)


def free_bytes(device: torch.device) -> int:
    """The device's free memory: CUDA's free bytes, else the CPU's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_batch_size(
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    device: torch.device,
    gram_dtype: str,
    fraction: float,
    sequential: bool,
    gram_device: str = "device",
    hidden_on_device: bool = False,
    forward_bytes: int = 0,
    world: World = SINGLE,
    free: int | None = None,
) -> BatchChoice:
    """The batch size for ``model.calib_batch_size=auto`` (the module's docstring).

    Args:
        calibration_ids: (n_samples, seq_len): the limit is one rank's share of the samples.
        sequential: ``runtime=sequential`` (one block and its Grams on the device).
        hidden_on_device: ``runtime.hidden_states=device``: every sample's hidden states (in and
            out of a block) stay on the device too.
        forward_bytes: the activations' element size under ``calibration.forward_dtype``.
        free: the free bytes to decide from (None: read from ``device``).
    """
    n_samples, seq_len = calibration_ids.shape
    limit = max(n_samples // world.size, 1)
    resident = resident_bytes(model, family, gram_dtype, sequential, gram_device)
    if hidden_on_device:
        d_model = min(_widths(model, family)[0].values())
        act = forward_bytes or _element_bytes(model)
        resident += 2 * n_samples * seq_len * d_model * act
    footprint = Footprint(
        free=free_bytes(device) if free is None else int(free),
        resident=int(resident),
        per_sample=sample_bytes(model, family, seq_len, gram_dtype, forward_bytes),
        fraction=float(fraction),
    )
    batch = fit_batch_size(footprint, limit)
    if world.size > 1:  # the smallest rank's choice, so every rank batches alike
        (batch,) = (-v for v in world_max(world, -batch))
    return BatchChoice(batch_size=batch, footprint=footprint, limit=limit)


def world_max(world: World, *values: int) -> list[int]:
    """Each of ``values`` maxed over the ranks."""
    tensor = torch.tensor(values, dtype=torch.int64, device=world.comm_device)
    world.all_reduce_(tensor, "max")
    return [int(v) for v in tensor.tolist()]
