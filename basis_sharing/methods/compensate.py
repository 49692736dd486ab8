"""The error-compensating sequential refit, ``method.update=sequential`` (docs/methods.md §10.1).

Layer by layer like SVD-LLM's update (``methods/update.py::refit_sequential``), but to the ORIGINAL
model's outputs: beside the compressed model's pass the dense layers run on the dense model's own
hidden states, and each member's coefficients solve C_j = argmin ||X^_j B C_j - X_j W_j||_F on its
own M^_j = X^_j^T X^_j and P_j = X^_j^T X_j (``linalg.refit.CompensatedSystem``), so the error the
earlier layers let through is compensated too. Optionally each shared basis is refit as well
(alternating least squares over its group, ``refit_basis``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from basis_sharing.calibration.grams import GramAccumulator, hooked_kinds
from basis_sharing.linalg.refit import CompensatedSystem, refit_shared_basis
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.methods.update import update_runner, update_summary
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules.shared_basis import shared_bases
from basis_sharing.runtime.sequential import (
    Block,
    LayerCall,
    call_layer,
    capture_input,
    layer_units,
    token_batches,
)

F64 = torch.float64


class CompensationStats:
    """One input of one layer, batch by batch: M^ = X^^T X^ and P = X^^T X.

    X^ are the inputs inside the compressed model, X those of the original model on the same
    tokens (rows in the same order); both in the run's Gram dtype. (M = X^T X is never needed:
    the errors' constant ||X W||_F^2 is summed from the dense projections' outputs.)
    """

    def __init__(self, dtype: torch.dtype | str) -> None:
        self.hat = GramAccumulator(dtype)
        self.cross: torch.Tensor | None = None  # (d_in, d_in)

    def add(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        """Fold one batch: ``x_hat`` and ``x`` are (..., d_in) over the same tokens."""
        if x_hat.shape != x.shape:
            raise ValueError(f"deviated inputs {tuple(x_hat.shape)} vs original {tuple(x.shape)}")
        self.hat.add(x_hat)
        where = {"device": self.hat.device, "dtype": self.hat.dtype}
        flat_hat = x_hat.detach().reshape(-1, x_hat.shape[-1]).to(**where)
        flat = x.detach().reshape(-1, x.shape[-1]).to(**where)
        if self.cross is None:
            self.cross = torch.zeros(flat.shape[1], flat.shape[1], **where)
        self.cross.addmm_(flat_hat.T, flat)

    def solved(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(M^, P) in float64 on ``device``, for the solves."""
        if self.cross is None:
            raise RuntimeError("no activations were accumulated for this input")
        return self.hat.gram.to(device, F64), self.cross.to(device, F64)


# One member's statistics: its input's (M^, P) and its ||X W||_F^2.
Member = tuple[CompensationStats, float]


def _capture(
    layer: nn.Module,
    family: FamilyAdapter,
    name: str,
    hidden: torch.Tensor,
    call: LayerCall,
    stop: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``capture_input`` at the projection that reads input ``name`` (its first reader)."""
    module = family.module(layer, hooked_kinds(family)[name])
    return capture_input(layer, module, hidden, call, stop)


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


def _refit_member(
    module: nn.Module,
    member: Member,
    weights: torch.Tensor,
    device: torch.device,
    eps: float,
) -> tuple[float, float]:
    """The member's compensated coefficients, installed in place; (error before, error after).

    The solve is exact unless B^T M^ B was singular and the shifted fallback solved it; a member
    whose error that would raise keeps its coefficients, so the refit never increases an error.
    """
    stats, energy = member
    basis = module.basis.weight.detach().T.to(device, F64)
    old = module.coefficient.weight.detach().T.to(device, F64, copy=True)
    system = CompensatedSystem.build(basis, *stats.solved(device), weights.to(device), energy)
    new = system.solve(eps)
    before, after = system.error(old), system.error(new)
    if after > before:
        return before, before
    module.coefficient.weight.copy_(new.T)
    return before, after


def _refit_basis(
    model: nn.Module,
    modules: Sequence[nn.Module],
    plan: GroupPlan,
    members: Sequence[Member],
    weights: Sequence[torch.Tensor],
    device: torch.device,
    eps: float,
    iterations: int,
) -> tuple[list[float], list[float]]:
    """ALS on a shared group; its one basis tensor and every C_j updated in place.

    Returns (the ALS objective history, each member's compensated error after it).
    """
    registry = shared_bases(model)[plan.basis_key]
    if any(m.basis is not registry for m in modules):
        raise RuntimeError(f"group {plan.basis_key} does not use model.shared_bases as its basis")
    solved = [stats.solved(device) for stats, _ in members]
    ws = [w.to(device, F64) for w in weights]
    basis = registry.weight.detach().T.to(device, F64, copy=True)
    coefficients = [m.coefficient.weight.detach().T.to(device, F64, copy=True) for m in modules]
    basis, coefficients, history = refit_shared_basis(
        basis,
        coefficients,
        [s[0] for s in solved],
        [s[1] for s in solved],
        ws,
        eps,
        iterations,
    )
    registry.weight.copy_(basis.T)
    for module, c in zip(modules, coefficients, strict=True):
        module.coefficient.weight.copy_(c.T)
    errors = [
        CompensatedSystem.build(basis, *s, w, energy).error(c)
        for s, (_, energy), w, c in zip(solved, members, ws, coefficients, strict=True)
    ]
    return history, errors


def _group_report(plan: GroupPlan, before: list[float], after: list[float]) -> dict:
    return {
        "kind": plan.kind,
        "layers": list(plan.layers),
        "error_before": math.sqrt(sum(e**2 for e in before)),
        "error_after": math.sqrt(sum(e**2 for e in after)),
        "members": [
            {"layer": i, "error_before": b, "error_after": a}
            for i, b, a in zip(plan.layers, before, after, strict=True)
        ],
    }


def _advance(
    block: Block, layer: nn.Module, index: int, deviated: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """The outputs of (refit) layer ``index`` on the deviated hidden states, per batch."""
    store = block.session.runner.hidden_device
    outputs = []
    for b, (hidden, calls) in enumerate(block.inputs()):
        hat = hidden if deviated is None else deviated[b].to(block.device)
        outputs.append(call_layer(layer, hat, calls[index]).to(store))
    return outputs


def _output_energy(x: torch.Tensor, weights: torch.Tensor) -> float:
    """||X W||_F^2 of one batch, X (..., d_in) and W (d_in, d_out), in float64."""
    flat = x.reshape(-1, x.shape[-1])
    return float((flat @ weights.to(flat)).to(F64).pow(2).sum())


def _refit_layer(
    block: Block,
    position: int,
    family: FamilyAdapter,
    kinds: Sequence[str],
    originals: dict,
    deviated: list[torch.Tensor] | None,
    original: list[torch.Tensor],
    ctx: CompressionContext,
    eps: float,
) -> tuple[dict[str, tuple[float, float]], dict[str, Member]]:
    """Refit layer ``block.layers[position]``'s ``kinds``, input by input in data-flow order.

    For each input (attention input, attention output, MLP input, MLP hidden: the family's
    order), every batch runs the dense layer on the original hidden states and the compressed
    layer on the deviated ones (``deviated``; None: the block's own inputs) up to the projection
    reading it, folding (X^, X) and ||X W_j||^2; then that input's kinds are refit. So o is
    refit on the outputs of the refit q/k/v and down on those of the refit up/gate, and no error
    is compensated twice. The last input's dense run goes to the end of the layer and advances
    ``original`` in place to the dense layer's outputs.

    Returns per kind (error before, error after) and the statistics it was refit on.
    """
    index, layer = block.layers[position], block.modules[position]
    dense = original_layer(layer, family, index, kinds, originals)
    stages = [
        (name, [k for k in readers if k in kinds])
        for name, readers in family.kinds_by_input().items()
        if any(k in kinds for k in readers)
    ]
    errors: dict[str, tuple[float, float]] = {}
    members: dict[str, Member] = {}
    store = block.session.runner.hidden_device
    for stage, (name, readers) in enumerate(stages):
        last = stage == len(stages) - 1
        stats = CompensationStats(ctx.gram_dtype)
        energy = dict.fromkeys(readers, 0.0)
        for b, (hidden, calls) in enumerate(block.inputs()):
            x, out = _capture(
                dense, family, name, original[b].to(block.device), calls[index], stop=not last
            )
            if last:
                original[b] = out.to(store)
            hat = hidden if deviated is None else deviated[b].to(block.device)
            x_hat, _ = _capture(layer, family, name, hat, calls[index], stop=True)
            with ctx.exact():
                for kind in readers:
                    energy[kind] += _output_energy(x, originals[(index, kind)])
                stats.add(x_hat, x)
        for kind in readers:
            members[kind] = (stats, energy[kind])
            with ctx.exact():
                errors[kind] = _refit_member(
                    family.module(layer, kind),
                    members[kind],
                    originals[(index, kind)],
                    ctx.device,
                    eps,
                )
    return errors, members


def _unit_plans(
    block: Block, family: FamilyAdapter, by_member: dict[tuple[int, str], GroupPlan]
) -> list[GroupPlan]:
    """The groups of the unit's layers, by first layer then the family's kind order."""
    plans = {by_member[(i, k)] for i in block.layers for k in family.kinds if (i, k) in by_member}
    return sorted(plans, key=lambda p: (p.layers[0], family.kinds.index(p.kind)))


def _refit_unit(
    block: Block,
    model: nn.Module,
    family: FamilyAdapter,
    by_member: dict[tuple[int, str], GroupPlan],
    originals: dict,
    original: list[torch.Tensor],
    ctx: CompressionContext,
    eps: float,
    refit_basis: bool,
    als_iterations: int,
) -> list[dict]:
    """Refit one unit layer by layer (then its shared bases); returns its groups' reports.

    ``original`` holds the dense model's hidden states entering the unit, advanced in place to
    those leaving it. When nothing changes after its last layer's refit, the unit's outputs are
    kept on the block; else the block recomputes them with the final weights.
    """
    plans = _unit_plans(block, family, by_member)
    als = [p for p in plans if refit_basis and p.shared]
    errors: dict[tuple[int, str], tuple[float, float]] = {}
    kept: dict[tuple[int, str], Member] = {}  # the ALS groups' members
    deviated: list[torch.Tensor] | None = None  # None: the block's own inputs
    for position, i in enumerate(block.layers):
        kinds = [k for k in family.kinds if (i, k) in by_member]
        layer_errors, stats = _refit_layer(
            block, position, family, kinds, originals, deviated, original, ctx, eps
        )
        errors.update({(i, kind): e for kind, e in layer_errors.items()})
        kept.update({(i, k): stats[k] for k in kinds if by_member[(i, k)] in als})
        if position < len(block.layers) - 1 or not als:
            deviated = _advance(block, block.modules[position], i, deviated)
    reports = []
    for plan in plans:
        before = [errors[(i, plan.kind)][0] for i in plan.layers]
        after = [errors[(i, plan.kind)][1] for i in plan.layers]
        report = _group_report(plan, before, after)
        if plan in als:
            modules = [
                family.module(block.modules[block.layers.index(i)], plan.kind) for i in plan.layers
            ]
            with ctx.exact():
                history, als_after = _refit_basis(
                    model,
                    modules,
                    plan,
                    [kept[(i, plan.kind)] for i in plan.layers],
                    [originals[(i, plan.kind)] for i in plan.layers],
                    ctx.device,
                    eps,
                    als_iterations,
                )
            report = {
                **_group_report(plan, before, als_after),
                "error_after_coefficients": report["error_after"],
                "als_objective": history,
            }
        reports.append(report)
    # Kept outputs are those of the final weights unless a basis refit changed the unit after.
    block.outputs = None if als else deviated
    return reports


def _check_units(plans: Sequence[GroupPlan], units: Sequence[tuple[int, ...]]) -> None:
    """Every group must lie inside one unit (its basis refit needs all of its members)."""
    unit_of = {i: u for u, unit in enumerate(units) for i in unit}
    for plan in plans:
        if len({unit_of[i] for i in plan.layers}) != 1:
            raise ValueError(
                f"group {plan.kind} {list(plan.layers)} straddles the units {list(units)}"
            )


def refit_compensating(
    model: nn.Module,
    family: FamilyAdapter,
    plans: list[GroupPlan],
    originals: dict,
    ctx: CompressionContext,
    eps: float,
    refit_basis: bool = False,
    samples: int | None = None,
    als_iterations: int = 2,
) -> dict:
    """The error-compensating sequential refit (``update=sequential``, docs/methods.md §10.1).

    One pass of the compressed model, in units of the largest group's size, layer by layer
    inside a unit. Beside the pass, the dense model's hidden states are kept, starting from the
    same embeddings. Each layer is refit input by input in data-flow order (``_refit_layer``):
    the dense layer (the compressed one with ``originals`` back) and the compressed layer run up
    to the projection reading that input, folding M^_j = X^^T X^, P_j = X^^T X and ||X W_j||^2,
    and that input's kinds get C_j = (B^T M^_j B)^{-1} B^T P_j W_j, each member on its own
    statistics, the basis fixed (a member whose error the solve would raise, possible only
    through the singular-system fallback, keeps its C_j).

    With ``refit_basis``, once every layer of a unit is refit, each shared group of the unit gets
    ``als_iterations`` rounds of alternating least squares over B and its C_j
    (``linalg.refit.refit_shared_basis``) on the statistics gathered above (for a member after
    the first, collected before the earlier members' basis moved); the one registered basis
    tensor is updated in place. The unit's outputs then propagate with the final weights.

    Args:
        originals: (layer, kind) -> the original W (d_in, d_out) (``snapshot_weights``).
        eps: the solves' fallback shift. samples: calibration samples used (None: all).

    Returns:
        ``{"mode": "sequential", "tokens", "error_before", "error_after", "groups"}``; per
        group its kind, layers and compensated errors ||X^ B C - X W||_F before and after (and
        per member); with a basis refit also ``error_after_coefficients`` and ``als_objective``
        (``refit_shared_basis``'s history).
    """
    ids = ctx.calibration_ids[:samples]
    tokens = int(ids.numel())
    if not plans:
        return update_summary("sequential", tokens, [])
    by_member = {(i, p.kind): p for p in plans for i in p.layers}
    units = layer_units(len(family.layers(model)), max(len(p.layers) for p in plans))
    _check_units(plans, units)
    runner = update_runner(model, family, ctx)
    groups: list[dict] = []
    with (
        torch.no_grad(),
        ctx.autocast(),
        runner.open(token_batches(ids, ctx.calib_batch_size), "update: layers") as session,
    ):
        original = [state.hidden for state in session.states]  # the embeddings: unchanged
        for block in session.blocks(units):
            groups += _refit_unit(
                block,
                model,
                family,
                by_member,
                originals,
                original,
                ctx,
                eps,
                refit_basis,
                als_iterations,
            )
    return update_summary("sequential", tokens, groups, ctx.forward_dtype)
