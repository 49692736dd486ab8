"""Refitting coefficients on deviated inputs (docs/methods.md §3.9 and §4.3).

Both updates keep every basis fixed and solve, per group, the least-squares problem
C = argmin ||X^ W_G - X^ B C||_F (``linalg.refit``), where X^ are the inputs the projections see
inside the compressed model:

- ``refit_single_pass`` (Basis Sharing, paper section 4.1): one forward pass of the fully
  compressed model over the calibration blocks gives every deviated Gram, then every group is
  refit at once. (The published code defines this step but never calls it.)
- ``refit_sequential`` (SVD-LLM's update): layer by layer, the inputs of layer i come from layers
  0..i-1 already compressed *and refit*; within a layer the inputs are refreshed in data-flow
  order (attention input, attention output, MLP input, MLP hidden), so o and down are refit on
  what the refit q/k/v and up/gate produce.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.calibration.grams import GramAccumulator, collect_grams
from basis_sharing.linalg.factorization import concat_weights
from basis_sharing.linalg.refit import output_error, refit_coefficients
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import FamilyAdapter


def refit_group(
    layers,
    family: FamilyAdapter,
    plan: GroupPlan,
    gram: torch.Tensor,
    originals: dict,
    device: torch.device,
    eps: float,
) -> dict:
    """Refit the coefficients of one group on the deviated Gram; returns both errors."""
    modules = [family.module(layers[i], plan.kind) for i in plan.layers]
    basis = modules[0].basis.weight.detach().T.to(device, torch.float64)
    w_group = concat_weights([originals[(i, plan.kind)] for i in plan.layers]).to(device)
    gram = gram.to(device, torch.float64)
    old = torch.cat([m.coefficient.weight.detach().T for m in modules], dim=1).to(device)
    new = refit_coefficients(basis, gram, w_group, eps)
    d_out = plan.d_out
    with torch.no_grad():
        for j, module in enumerate(modules):
            module.coefficient.weight.copy_(new[:, j * d_out : (j + 1) * d_out].T)
    return {
        "kind": plan.kind,
        "layers": list(plan.layers),
        "error_before": output_error(gram, w_group, basis @ old.to(torch.float64)),
        "error_after": output_error(gram, w_group, basis @ new),
    }


def _summary(mode: str, tokens: int, groups: list[dict]) -> dict:
    total = {
        key: math.sqrt(sum(g[key] ** 2 for g in groups)) for key in ("error_before", "error_after")
    }
    return {"mode": mode, "tokens": tokens, **total, "groups": groups}


def refit_single_pass(
    model: nn.Module,
    family: FamilyAdapter,
    plans: list[GroupPlan],
    originals: dict,
    ctx: CompressionContext,
    eps: float,
) -> dict:
    """Every group refit on the Grams of one pass of the compressed model."""
    deviated = collect_grams(
        model,
        family,
        ctx.calibration_ids,
        ctx.calib_batch_size,
        ctx.extras.get("gram_dtype", torch.float32),
        desc="update: deviated inputs",
    )
    layers = family.layers(model)
    groups = []
    for plan in tqdm(plans, desc="update: refit", unit="group", leave=False):
        gram = deviated.group_gram(plan.layers, family.projection(plan.kind).input)
        groups.append(refit_group(layers, family, plan, gram, originals, ctx.device, eps))
    return _summary("single_pass", deviated.tokens, groups)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first decoder layer's input."""


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per batch: the hidden states the first decoder layer receives, and every layer's keywords.

    Captured with pre-hooks (GPTQ's "catcher") so layers can be run one at a time on any family
    without knowing how it builds masks and position embeddings. The keywords are taken per layer
    because they can differ between layers (Gemma-2 alternates sliding-window and full-attention
    masks); they are references to what the model built, not copies. The pass stops before the
    last layer runs.
    """
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, list[dict]]] = []
    current: dict = {}

    def hook(index: int):
        def record(_module, args, kwargs):
            if index == 0:
                current["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
            current["kwargs"].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise _Captured

        return record

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.inference_mode():
            for start in range(0, ids.shape[0], batch_size):
                current.update(hidden=None, kwargs=[])
                try:
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _Captured:
                    pass
                captured.append((current["hidden"], current["kwargs"]))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _run_layer(
    layer: nn.Module, index: int, batches: list[tuple[torch.Tensor, list[dict]]]
) -> list:
    """Layer ``index`` on each batch's hidden states, with that layer's own keywords."""
    outputs = []
    with torch.inference_mode():
        for hidden, kwargs in batches:
            out = layer(hidden, **kwargs[index])
            outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def refit_sequential(
    model: nn.Module,
    family: FamilyAdapter,
    plans: list[GroupPlan],
    originals: dict,
    ctx: CompressionContext,
    eps: float,
) -> dict:
    """SVD-LLM's update: layer by layer on the outputs of the compressed, refit earlier layers."""
    layers = family.layers(model)
    by_member = {(i, p.kind): p for p in plans for i in p.layers}
    if any(p.shared for p in plans):
        raise ValueError("the sequential update refits one-layer groups only")
    dtype = ctx.extras.get("gram_dtype", torch.float32)
    batches = capture_layer_inputs(model, layers, ctx.calibration_ids, ctx.calib_batch_size)
    groups = []
    for i, layer in enumerate(tqdm(layers, desc="update: layers", unit="layer", leave=False)):
        for kinds in family.kinds_by_input().values():
            acc = GramAccumulator(dtype)
            module = family.module(layer, kinds[0])
            handle = module.register_forward_hook(lambda _m, args, _o, acc=acc: acc.add(args[0]))
            try:
                _run_layer(layer, i, batches)
            finally:
                handle.remove()
            for kind in kinds:
                groups.append(
                    refit_group(
                        layers, family, by_member[(i, kind)], acc.gram, originals, ctx.device, eps
                    )
                )
        batches = _run_layer(layer, i, batches)
    tokens = int(ctx.calibration_ids.numel())
    return _summary("sequential", tokens, groups)
