"""The dense model's stream beside a layer-by-layer refit (docs/methods.md §10.1).

Both layer-by-layer refits run the original (dense) layers next to the compressed ones on the
same tokens: ``update=sequential`` (``methods/compensate.py``) refits to their outputs, and
``update=layerwise refit_gram=control`` (``methods/update.py``) uses their Grams as a control
variate. With the refit on n of the calibration's N samples, the deviated Gram of a layer's input
is estimated as

    M^ ~ M + (N_tokens / n_tokens) (M^_n - M_n),

M the calibration Gram of the dense model's inputs (all N samples, already computed), M^_n and
M_n the compressed and the dense model's Grams on the n refit samples. The sampling noise left is
that of the deviation M^ - M, not of the whole Gram: with the deviation small beside M, n samples
estimate M^ about as well as many more would alone. With n = N it is M^_N exactly (to rounding).
Where the estimate is not positive definite (``controlled_gram``) the plain one is used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from basis_sharing.calibration.grams import GramAccumulator, hooked_kinds
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.sequential import Block, call_layer

F64 = torch.float64


def _dense_linear(weights: torch.Tensor, module: nn.Module) -> nn.Linear:
    """nn.Linear computing x W (+ the compressed ``module``'s bias), in its dtype and device."""
    coefficient = module.coefficient.weight
    bias = module.coefficient.bias
    d_in, d_out = weights.shape
    dense = nn.Linear(
        d_in, d_out, bias=bias is not None, device=coefficient.device, dtype=coefficient.dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weights.T)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def original_layer(
    layer: nn.Module, family: FamilyAdapter, index: int, kinds: Sequence[str], originals: dict
) -> nn.Module:
    """A copy of compressed decoder layer ``index`` with its ``kinds`` dense again.

    The compressed leaves are swapped out while copying (a shared basis's registry is not copied),
    and each is replaced in the copy by an ``nn.Linear`` holding ``originals[(index, kind)]``.
    """
    compressed = {kind: family.module(layer, kind) for kind in kinds}
    for kind in kinds:
        family.set_module(layer, kind, nn.Identity())
    try:
        dense = copy.deepcopy(layer)
    finally:
        for kind, module in compressed.items():
            family.set_module(layer, kind, module)
    for kind, module in compressed.items():
        family.set_module(dense, kind, _dense_linear(originals[(index, kind)], module))
    return dense


def dense_layer_grams(
    block: Block,
    family: FamilyAdapter,
    kinds: Sequence[str],
    originals: dict,
    original: list[torch.Tensor],
    ctx: CompressionContext,
) -> dict[str, GramAccumulator]:
    """The dense layer's input Grams on the dense model's hidden states ``original``, one
    forward per batch; ``original`` is advanced in place to the dense layer's outputs.

    ``block`` holds one compressed layer, ``kinds`` its compressed kinds. Returns input name ->
    its Gram (every input of the family, captured at its first reader as calibration does).
    """
    (index,), layer = block.layers, block.modules[0]
    dense = original_layer(layer, family, index, kinds, originals)
    grams = {name: GramAccumulator(ctx.gram_dtype) for name in family.kinds_by_input()}

    def hook(name: str):
        def fold(_module: nn.Module, args: tuple) -> None:
            with ctx.exact():
                grams[name].add(args[0])

        return fold

    handles = [
        family.module(dense, kind).register_forward_pre_hook(hook(name))
        for name, kind in hooked_kinds(family).items()
    ]
    store = block.session.runner.hidden_device
    try:
        for b, (_, calls) in enumerate(block.inputs()):
            out = call_layer(dense, original[b].to(block.device), calls[index])
            original[b] = out.to(store)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def controlled_gram(
    deviated: GramAccumulator, dense: GramAccumulator, calibration: torch.Tensor, tokens: int
) -> tuple[GramAccumulator, bool]:
    """M + (tokens / n) (M^_n - M_n) in float64 (the module docstring), on the calibration's
    ``tokens`` (so the refit's scale rules treat it as a full-sample Gram), and whether it is
    that estimate.

    A Gram is positive semi-definite, the estimate need not be: where the deviation measured on
    n samples is large beside M in some direction, its sampling noise can make an eigenvalue
    negative, and no whitening or least squares on it is meaningful. Then (a failed Cholesky)
    the plain estimate (tokens / n) M^_n is returned instead, with False.

    Args:
        deviated: M^_n, the compressed model's Gram on the refit samples.
        dense: M_n, the dense model's Gram on the same tokens. calibration: M (all tokens).
    """
    if deviated.tokens != dense.tokens or deviated.gram is None or dense.gram is None:
        raise ValueError(
            f"the deviated ({deviated.tokens}) and dense ({dense.tokens}) Grams must cover the "
            "same tokens"
        )
    scale = tokens / deviated.tokens
    hat = deviated.gram.to(F64)
    gram = calibration.to(hat.device, F64) + scale * (hat - dense.gram.to(hat.device, F64))
    _, info = torch.linalg.cholesky_ex(gram)
    controlled = int(info) == 0
    estimate = GramAccumulator(F64)
    estimate.gram, estimate.tokens = (gram if controlled else scale * hat), tokens
    return estimate, controlled
