"""Refitting coefficients on deviated inputs (docs/methods.md §3.9 and §4.3).

The first two updates keep every basis fixed and solve, per group, the least-squares problem
C = argmin ||X^ W_G - X^ B C||_F (``linalg.refit``), where X^ are the inputs the projections see
inside the compressed model:

- ``refit_single_pass`` (Basis Sharing, paper section 4.1): one forward pass of the fully
  compressed model over the calibration blocks gives every deviated Gram, then every group is
  refit at once. (The published code defines this step but never calls it.)
- ``refit_sequential`` (SVD-LLM's update, ``update=layerwise``): layer by layer, the inputs of
  layer i come from layers 0..i-1 already compressed *and refit*; within a layer the inputs are
  refreshed in data-flow order (attention input, attention output, MLP input, MLP hidden), so o
  and down are refit on what the refit q/k/v and up/gate produce. On a shared group (beyond the
  paper, docs/methods.md §10.1) each member is refit when its layer is reached, on its own
  deviated Gram, C_j = (B^T M^_j B)^{-1} B^T M^_j W_j, the shared basis fixed. With
  ``refit_basis`` the basis is re-derived too, once, when the group's first member is reached
  (``rederive_basis``).
The third, ``update=sequential``, refits to the original model's outputs instead
(``methods/compensate.py``, docs/methods.md §10.1); it shares ``update_summary`` and
``update_runner`` with these two.

All run on the runtime's ``BlockRunner`` when the run has one (``runtime=sequential``: one block
on the device at a time); the sequential ones use a runner either way, on the model's own
device under ``runtime=full``. The numbers are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.calibration.grams import GramAccumulator, collect_grams
from basis_sharing.linalg.factorization import concat_weights, decompose_shared
from basis_sharing.linalg.refit import output_error, refit_coefficients
from basis_sharing.linalg.whitening import DEFAULT_EPS, whiten
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import ATTN_OUT, FamilyAdapter
from basis_sharing.runtime.replay import AttentionReplay, attention_of
from basis_sharing.runtime.sequential import (
    Block,
    BlockRunner,
    call_layer,
    capture_input,
    token_batches,
)


def refit_group(
    layers,
    family: FamilyAdapter,
    plan: GroupPlan,
    gram: torch.Tensor,
    originals: dict,
    device: torch.device,
    eps: float,
    members: tuple[int, ...] | None = None,
) -> dict:
    """Refit coefficients of one group on the deviated Gram; returns both errors.

    ``members`` (default: every layer of the group) are the layers refit, together, on ``gram``
    (their summed Gram); the others keep their coefficients. The basis is fixed, so a subset is
    the least-squares problem of those members alone.
    """
    members = plan.layers if members is None else members
    modules = [family.module(layers[i], plan.kind) for i in members]
    basis = modules[0].basis.weight.detach().T.to(device, torch.float64)
    w_group = concat_weights([originals[(i, plan.kind)] for i in members]).to(device)
    gram = gram.to(device, torch.float64)
    old = torch.cat([m.coefficient.weight.detach().T for m in modules], dim=1).to(device)
    new = refit_coefficients(basis, gram, w_group, eps)
    d_out = plan.d_out
    with torch.no_grad():
        for j, module in enumerate(modules):
            module.coefficient.weight.copy_(new[:, j * d_out : (j + 1) * d_out].T)
    report = {"kind": plan.kind, "layers": list(members)}
    if tuple(members) != tuple(plan.layers):
        report["group"] = list(plan.layers)
    return {
        **report,
        "error_before": output_error(gram, w_group, basis @ old.to(torch.float64)),
        "error_after": output_error(gram, w_group, basis @ new),
    }


@dataclass(frozen=True)
class BasisRefit:
    """How ``refit_sequential`` re-derives a basis: the method's whitening, regulariser and SVD
    path (``method.whitening``, ``method.eps``, ``method.decomposition``)."""

    whitening: str = "cholesky"
    eps: float = DEFAULT_EPS
    path: str = "svd"
    # Whether the factors being replaced came from the first pass's decomposition (then the
    # member's error with them is reported); False: the first pass installed placeholders.
    replaces_decomposed: bool = True


def rederive_basis(
    layers,
    family: FamilyAdapter,
    plan: GroupPlan,
    deviated: torch.Tensor,
    original_grams: list[torch.Tensor],
    originals: dict,
    device: torch.device,
    how: BasisRefit,
) -> None:
    """The group's whitened truncation again, on the Grams the refit has when its first member
    is reached (docs/methods.md §10.1).

    The first member's Gram is its deviated one, ``deviated`` (its inputs inside the compressed,
    refit model so far, on the original Grams' token scale: ``on_calibration_scale``); the later
    members' inputs are not known yet (they depend on this layer's new factors), so their original
    Grams ``original_grams`` stand in. The basis and
    every member's coefficients are replaced at the plan's rank; a private layer (a group of one)
    gets the whitened truncation of its deviated Gram, the best rank-k fit on those inputs.
    """
    gram = deviated.to(device, torch.float64)
    for other in original_grams:
        gram = gram + other.to(device, torch.float64)
    whitening = whiten(gram, how.whitening, eps=how.eps)
    weights = [originals[(i, plan.kind)].to(device) for i in plan.layers]
    dec = decompose_shared(weights, whitening.S, whitening.shift, how.whitening, how.path)
    basis, coefficients = dec.truncate(plan.rank)
    modules = [family.module(layers[i], plan.kind) for i in plan.layers]
    with torch.no_grad():
        # One module holds a shared basis for every member: copying through the first is enough.
        base = modules[0].basis.weight
        base.copy_(basis.T.to(base.device, base.dtype))
        for module, c in zip(modules, coefficients, strict=True):
            weight = module.coefficient.weight
            weight.copy_(c.T.to(weight.device, weight.dtype))


def on_calibration_scale(acc: GramAccumulator, tokens: int) -> torch.Tensor:
    """``acc``'s Gram as if summed over the calibration's ``tokens``: with ``refit_samples`` the
    deviated Gram covers fewer tokens than the original Grams it is added to, and each member
    must weigh alike in the group's sum. Unscaled (the same tensor) when the counts agree."""
    if acc.tokens == tokens:
        return acc.gram
    return acc.gram * (tokens / acc.tokens)


def member_error(layers, family, plan: GroupPlan, i: int, gram, originals: dict) -> float:
    """||X^_i (W_i - B C_i)||_F of member ``i`` on ``gram`` with its current factors."""
    module = family.module(layers[i], plan.kind)
    basis = module.basis.weight.detach().T.to(torch.float64)
    coefficient = module.coefficient.weight.detach().T.to(basis.device, torch.float64)
    weights = originals[(i, plan.kind)].to(basis.device)
    return output_error(gram.to(basis.device), weights, basis @ coefficient)


def update_summary(
    mode: str, tokens: int, groups: list[dict], forward_dtype: str | None = None
) -> dict:
    """The record's ``method_info.update``: the mode, tokens, total errors and every group's;
    ``forward_dtype`` when its passes ran under autocast (``calibration.forward_dtype``)."""
    total = {
        key: math.sqrt(sum(g[key] ** 2 for g in groups)) for key in ("error_before", "error_after")
    }
    summary = {"mode": mode, "tokens": tokens, **total, "groups": groups}
    if forward_dtype is not None:
        summary["forward_dtype"] = forward_dtype
    return summary


def refit_single_pass(
    model: nn.Module,
    family: FamilyAdapter,
    plans: list[GroupPlan],
    originals: dict,
    ctx: CompressionContext,
    eps: float,
) -> dict:
    """Every group refit on the Grams of one pass of the compressed model (block by block with
    ``ctx.runner``)."""
    with ctx.autocast():
        deviated = collect_grams(
            model,
            family,
            ctx.calibration_ids,
            ctx.calib_batch_size,
            ctx.gram_dtype,
            desc="update: deviated inputs",
            runner=ctx.runner,
        )
    layers = family.layers(model)
    groups = []
    for plan in tqdm(plans, desc="update: refit", unit="group", leave=False):
        gram = deviated.group_gram(plan.layers, family.projection(plan.kind).input)
        groups.append(refit_group(layers, family, plan, gram, originals, ctx.device, eps))
    return update_summary("one_pass", deviated.tokens, groups, ctx.forward_dtype)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def update_runner(model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> BlockRunner:
    """The run's block runner; under ``runtime=full`` one on the model's own device."""
    if ctx.runner is not None:
        return ctx.runner
    device = _model_device(model)
    return BlockRunner(model, family, device, hidden_device=device)


def _attention_replay(
    layer: nn.Module, family: FamilyAdapter, i: int, by_member: dict, block: Block
) -> AttentionReplay | None:
    """A replay of layer ``i``'s attention when its output projection is refit here (the pass
    that records x_o is then run anyway) and sits inside an attention module."""
    readers = [k for k in family.kinds_by_input().get(ATTN_OUT, ()) if (i, k) in by_member]
    if len(readers) != 1:
        return None
    attention = attention_of(layer, family.projection(readers[0]).path)
    if attention is None:
        return None
    return AttentionReplay(
        attention, family.module(layer, readers[0]), block.session.runner.hidden_device
    )


def _replayed_outputs(block: Block, layer: nn.Module, replay: AttentionReplay) -> list:
    """The refit layer's outputs, batch by batch, its attention replayed."""
    (i,) = block.layers
    store = block.session.runner.hidden_device
    outputs = []
    for b, (hidden, calls) in enumerate(block.inputs()):
        with replay.replaying(b):
            outputs.append(call_layer(layer, hidden, calls[i]).to(store))
    return outputs


def _refit_kinds(
    layers,
    family: FamilyAdapter,
    by_member: dict,
    i: int,
    kinds: list[str],
    acc: GramAccumulator,
    originals: dict,
    ctx: CompressionContext,
    eps: float,
    refit_basis: BasisRefit | None,
) -> list[dict]:
    """Layer ``i``'s ``kinds`` (one input's readers) refit on that input's deviated Gram ``acc``,
    each basis first re-derived at its group's first member under ``refit_basis``; a report each."""
    reports = []
    for kind in kinds:
        plan = by_member[(i, kind)]
        before = None
        rederive = refit_basis is not None and i == plan.layers[0]
        if rederive:
            if refit_basis.replaces_decomposed:
                before = member_error(layers, family, plan, i, acc.gram, originals)
            input_name = family.projection(kind).input
            others = [ctx.stats["gram"].gram(j, input_name) for j in plan.layers[1:]]
            rederive_basis(
                layers,
                family,
                plan,
                on_calibration_scale(acc, ctx.stats["gram"].tokens),
                others,
                originals,
                ctx.device,
                refit_basis,
            )
        report = refit_group(layers, family, plan, acc.gram, originals, ctx.device, eps, (i,))
        if rederive:
            report["basis_refit"] = True
        if before is not None:
            report["error_before"] = before
        reports.append(report)
    return reports


def refit_sequential(
    model: nn.Module,
    family: FamilyAdapter,
    plans: list[GroupPlan],
    originals: dict,
    ctx: CompressionContext,
    eps: float,
    samples: int | None = None,
    refit_basis: BasisRefit | None = None,
    replay_attention: bool = True,
) -> dict:
    """SVD-LLM's update: layer by layer on the outputs of the compressed, refit earlier layers.

    Each layer is a block of the runner. For each input in data-flow order, every batch runs the
    layer (with its kinds before that input already refit) only up to the projection reading it,
    whose Gram is taken; that input's kinds are refit; when the layer is done the runner
    propagates its outputs to the next one. A member of a shared group is refit alone, on its own
    layer's Gram (the basis fixed), so one report per member: a shared member's names its
    ``group``. ``samples``: the first N calibration samples (None: all). ``refit_basis``: when a
    group's first member is reached, its basis is first re-derived (``rederive_basis``); that
    member's report has ``basis_refit`` and its ``error_before`` is the one before the new basis
    (with ``refit_basis.replaces_decomposed=False`` the first pass installed placeholders, and it
    is the error of the re-derived factors before the coefficient refit).

    ``replay_attention``: once a layer's o input is recorded, its later calls (MLP input, MLP
    hidden, the outputs that propagate) replay the attention as o(x_o) instead of recomputing
    q/k/v and the attention (``runtime.replay``; the same numbers bit for bit, checked per
    batch). The summary's ``replayed_layers`` counts the layers where it applied.
    """
    by_member = {(i, p.kind): p for p in plans for i in p.layers}
    ids = ctx.calibration_ids[:samples]
    runner = update_runner(model, family, ctx)
    layers = family.layers(model)
    groups = []
    replayed = 0
    with (
        torch.no_grad(),
        ctx.autocast(),
        runner.open(token_batches(ids, ctx.calib_batch_size), desc="update: layers") as session,
    ):
        for block in session.blocks():
            (i,) = block.layers
            layer = block.modules[0]
            replay = (
                _attention_replay(layer, family, i, by_member, block) if replay_attention else None
            )
            for name, kinds in family.kinds_by_input().items():
                kinds = [k for k in kinds if (i, k) in by_member]
                if not kinds:
                    continue
                acc = GramAccumulator(ctx.gram_dtype)
                module = family.module(layer, kinds[0])
                recording = replay is not None and name == ATTN_OUT
                replaying = replay is not None and replay.ready
                for b, (hidden, calls) in enumerate(block.inputs()):
                    if recording:
                        x = replay.record(layer, hidden, calls[i])
                    elif replaying:
                        with replay.replaying(b):
                            x, _ = capture_input(layer, module, hidden, calls[i], stop=True)
                    else:
                        x, _ = capture_input(layer, module, hidden, calls[i], stop=True)
                    with ctx.exact():
                        acc.add(x)
                with ctx.exact():
                    groups += _refit_kinds(
                        layers, family, by_member, i, kinds, acc, originals, ctx, eps, refit_basis
                    )
                if recording and replay.ready:
                    replay.freeze()  # o is refit: nothing in the attention changes any more
            if replay is not None and replay.ready:
                block.outputs = _replayed_outputs(block, layer, replay)
                replayed += 1
            # leaving the block: the runner propagates the refit layer's outputs
    summary = update_summary("layerwise", int(ids.numel()), groups, ctx.forward_dtype)
    return {**summary, "replayed_layers": replayed}
