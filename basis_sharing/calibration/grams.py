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

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.errors import CalibrationError, ConfigError
from basis_sharing.models.families import FamilyAdapter

log = logging.getLogger(__name__)

# Half precision would overflow and lose the small eigenvalues the whitening needs (fp32 as in the
# reference code; fp64 for exact tests or very long calibration runs).
ACCUMULATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def accumulate_dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name ("float32" or "float64") of an accumulation dtype given as dtype or string.

    Raises:
        ConfigError: any other dtype (half precision is refused, see ACCUMULATE_DTYPES).
    """
    name = str(dtype).removeprefix("torch.")
    if name not in ACCUMULATE_DTYPES:
        raise ConfigError(
            f"Unsupported Gram accumulation dtype '{name}'. Valid choices: "
            f"{', '.join(ACCUMULATE_DTYPES)}."
        )
    return name


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


class GramAccumulator:
    """Running X^T X of one activation stream, fed batch by batch.

    The Gram lives on the device of the first batch so the (tokens, d_in) x (tokens, d_in) product
    runs where the activations are; only the (d_in, d_in) result ever moves to the CPU.
    """

    def __init__(self, dtype: torch.dtype | str = torch.float32) -> None:
        self.dtype = ACCUMULATE_DTYPES[accumulate_dtype_name(dtype)]
        self.gram: torch.Tensor | None = None  # (d_in, d_in)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold activations ``x``: (..., d_in) into the Gram; every leading position is a token."""
        x = x.detach()
        if self.gram is not None and x.device != self.gram.device:
            x = x.to(self.gram.device)  # e.g. a model split over devices by accelerate
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)  # (tokens, d_in)
        if self.gram is None:
            d_in = flat.shape[1]
            self.gram = torch.zeros(d_in, d_in, dtype=self.dtype, device=flat.device)
        elif flat.shape[1] != self.gram.shape[0]:
            raise ValueError(
                f"Activation width {flat.shape[1]} does not match the Gram's {self.gram.shape[0]}."
            )
        self.gram.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]


def hooked_kinds(family: FamilyAdapter) -> dict[str, str]:
    """input name -> the one projection kind whose input is captured for it (the first reader)."""
    return {name: kinds[0] for name, kinds in family.kinds_by_input().items()}


def _attach_hooks(
    model: nn.Module, family: FamilyAdapter, dtype: torch.dtype
) -> tuple[dict[tuple[int, str], GramAccumulator], list[torch.utils.hooks.RemovableHandle]]:
    """One accumulator and one forward hook per (layer, distinct input)."""
    accumulators: dict[tuple[int, str], GramAccumulator] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for index, layer in enumerate(family.layers(model)):
            for name, kind in hooked_kinds(family).items():
                acc = accumulators[(index, name)] = GramAccumulator(dtype)
                module = family.module(layer, kind)
                handles.append(module.register_forward_hook(_hook(acc), with_kwargs=True))
    except BaseException:
        _remove(handles)
        raise
    return accumulators, handles


def _hook(acc: GramAccumulator):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        # Linear and GPT-2 Conv1D both take the activation as their first argument.
        acc.add(args[0] if args else next(iter(kwargs.values())))

    return hook


def _remove(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _input_device(model: nn.Module) -> torch.device:
    """Where the token ids must go: the embedding's device (the first device of a split model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _run_batches(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int, desc: str):
    device = _input_device(model)
    starts = range(0, calibration_ids.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="batch", leave=False):
            batch = calibration_ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)


def _to_stats(accumulators: dict[tuple[int, str], GramAccumulator], dtype: str) -> GramStats:
    """Move the Grams to the CPU as ordinary (non-inference) tensors and check the token counts."""
    counts = {key: acc.tokens for key, acc in accumulators.items()}
    if len(set(counts.values())) != 1 or any(acc.gram is None for acc in accumulators.values()):
        raise RuntimeError(f"Hooked projections saw different token counts: {counts}.")
    # clone() outside inference mode turns inference tensors into ordinary ones that callers
    # may update in place.
    grams = {key: acc.gram.to("cpu").clone() for key, acc in accumulators.items()}
    return GramStats(grams=grams, tokens=next(iter(counts.values())), dtype=dtype)


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


def run_hooked(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    batch_size: int,
    desc: str,
    handles: list[torch.utils.hooks.RemovableHandle],
) -> None:
    """One inference pass over the blocks with ``handles`` attached.

    The model is in eval mode for the pass (dropout would make the statistics random); the hooks
    are removed and the mode restored whatever happens.
    """
    was_training = model.training
    model.eval()
    try:
        _run_batches(model, calibration_ids, batch_size, desc)
    finally:
        _remove(handles)
        if was_training:
            model.train()


def collect_grams(
    model: nn.Module,
    family: FamilyAdapter,
    calibration_ids: torch.Tensor,
    batch_size: int,
    accumulate_dtype: torch.dtype | str = torch.float32,
    desc: str = "calibration",
) -> GramStats:
    """X^T X of every distinct projection input of every decoder layer, in one forward pass.

    Args:
        model: the original (uncompressed) causal LM, on any device; put in eval mode for the pass.
        family: its adapter (where the layers and projections are, which input each reads).
        calibration_ids: (n_samples, seq_len) int64 token ids; every token counts.
        batch_size: samples per forward pass (does not change the result beyond rounding).
        accumulate_dtype: float32 (the reference) or float64.
        desc: progress-bar label.

    Returns:
        GramStats: one (d_in, d_in) CPU Gram per (layer, input); tokens = n_samples * seq_len.
    """
    dtype_name = accumulate_dtype_name(accumulate_dtype)
    check_calibration_ids(calibration_ids, batch_size)
    accumulators, handles = _attach_hooks(model, family, ACCUMULATE_DTYPES[dtype_name])
    run_hooked(model, calibration_ids, batch_size, desc, handles)
    stats = _to_stats(accumulators, dtype_name)
    log.info(
        "Collected %d Grams (%d layers x %d inputs) over %d tokens in %s.",
        len(stats.grams),
        len(family.layers(model)),
        len(hooked_kinds(family)),
        stats.tokens,
        dtype_name,
    )
    return stats
