"""FiPS's local reconstruction of one block group (docs/methods.md §9.4-§9.6).

For each group: U and the V slices from the SVD of the group's oriented MLP matrices; the targets
Y = MLP_orig(X) of every member on its calibration inputs X, computed before any matrix is
replaced; then, one MLP at a time in layer order, that MLP's V slices and the group's U are trained
to minimise MSE(MLP_c(x), MLP_orig(x)) on shuffled token mini-batches (AdamW or SGD, cosine
schedule) while gradual magnitude pruning takes its V to the target sparsity. U changes with every
member, after the earlier members' V are fixed (the released procedure): ``u_update=joint`` ends
with a pass that trains U alone on every member's loss. Training runs in float32 whatever the
model's dtype (float64 for a float64 model); the trained factors are installed as
``SparseFactorLinear`` in the model's dtype.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from basis_sharing.linalg.fips import orient, svd_init
from basis_sharing.linalg.pruning import GMPSchedule, magnitude_masks, two_four_mask
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import SparseFactorLinear, compressed_modules, shared_bases
from basis_sharing.modules.factors import basis_linear

if TYPE_CHECKING:
    from basis_sharing.calibration.mlp_inputs import MLPInputs
    from basis_sharing.methods.fips import FiPS, FipsGroupPlan

log = logging.getLogger(__name__)

EVAL_CHUNK = 4096  # tokens per forward when a loss or a target is computed over all tokens


class MaskedFactor(nn.Module):
    """The training form of a FiPS projection: dense V (r, w) times a fixed boolean mask.

    It computes exactly what ``SparseFactorLinear`` computes from the same U, V and mask.
    """

    def __init__(
        self, basis: nn.Linear, v: torch.Tensor, transposed: bool, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        object.__setattr__(self, "basis", basis)  # the group's U, trained by whoever owns it
        self.v = nn.Parameter(v)
        self.register_buffer("mask", torch.ones_like(v, dtype=torch.bool))
        self.register_buffer("bias", bias)
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v * self.mask
        if self.transposed:
            y = F.linear(F.linear(x, v), self.basis.weight.T)
        else:
            y = F.linear(self.basis(x), v.T)
        return y if self.bias is None else y + self.bias

    def prune_dim(self) -> int:
        """V's axis that is the input side of its product (where 2:4 runs along)."""
        return 1 if self.transposed else 0


class Member:
    """One MLP of the group: its layer, its factors by kind, its inputs and targets."""

    def __init__(self, layer: int, mlp: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.layer, self.mlp, self.x, self.y = layer, mlp, x, y
        self.factors: dict[str, MaskedFactor] = {}

    def loss(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return F.mse_loss(self.mlp(x), y)

    @torch.no_grad()
    def full_loss(self) -> float:
        """MSE over every token (chunked)."""
        total = 0.0
        for start in range(0, self.x.shape[0], EVAL_CHUNK):
            x, y = self.x[start : start + EVAL_CHUNK], self.y[start : start + EVAL_CHUNK]
            total += float(((self.mlp(x) - y) ** 2).sum())
        return total / self.y.numel()

    def sparsity(self) -> float:
        kept = sum(int(f.mask.sum()) for f in self.factors.values())
        return 1.0 - kept / sum(f.mask.numel() for f in self.factors.values())


class Batches:
    """Shuffled mini-batches of token indices; a new permutation each time one is used up."""

    def __init__(self, n: int, size: int, seed: int, device: torch.device) -> None:
        self.n, self.size, self.device = n, min(size, n), device
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.size:
            self.order = torch.randperm(self.n, generator=self.generator)
        idx, self.order = self.order[: self.size], self.order[self.size :]
        return idx.to(self.device)


def optimizer_for(params: list[nn.Parameter], cfg: Any, steps: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.lr_min)


def gmp_schedule(method: FiPS, steps: int) -> GMPSchedule | None:
    cfg = method.cfg
    if cfg.sparsity == 0:
        return None
    initial, accel = method.gmp_levels()
    return GMPSchedule(
        steps=steps,
        final=cfg.sparsity,
        initial=initial,
        accel=accel,
        t_accel=int(cfg.t_accel * steps),
        t_end=int(cfg.t_end * steps),
        delta_t=cfg.delta_t,
        schedule=cfg.schedule,
    )


@torch.no_grad()
def one_shot_pruned_loss(member: Member, sparsity: float, two_four: bool) -> float | None:
    """The loss with V pruned once, by magnitude, to the target (what training must beat)."""
    if sparsity == 0:
        return None
    saved = [(f.v.clone(), f.mask.clone()) for f in member.factors.values()]
    update_masks(member, sparsity, two_four)
    loss = member.full_loss()
    for f, (v, mask) in zip(member.factors.values(), saved, strict=True):
        f.v.copy_(v)
        f.mask.copy_(mask)
    return loss


@torch.no_grad()
def update_masks(member: Member, sparsity: float, two_four: bool) -> None:
    """Global magnitude masks over the member's V slices (2:4 per slice with ``two_four``)."""
    factors = list(member.factors.values())
    if two_four:
        masks = [two_four_mask(f.v * f.mask, f.prune_dim()) for f in factors]
    else:
        masks = magnitude_masks([f.v * f.mask for f in factors], sparsity)
    for f, mask in zip(factors, masks, strict=True):
        f.mask.copy_(mask)
        f.v.mul_(mask)


def train_member(member: Member, basis: nn.Linear, method: FiPS, desc: str) -> dict[str, Any]:
    """Train one MLP's V slices and the group's U, pruning V on the GMP schedule."""
    cfg = method.cfg
    steps = cfg.steps
    params = [f.v for f in member.factors.values()] + [basis.weight]
    opt, sched = optimizer_for(params, cfg, steps)
    gmp = gmp_schedule(method, steps)
    updates = gmp.update_steps() if gmp else []
    last_update = updates[-1] if updates else None
    batches = Batches(member.x.shape[0], cfg.batch_tokens, cfg.seed + member.layer, member.x.device)
    start = member.full_loss()  # U may have moved with the members trained before it
    pruned = one_shot_pruned_loss(member, cfg.sparsity, cfg.structure == "2:4")
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for t in bar:
        if gmp is not None and t in updates:
            two_four = cfg.structure == "2:4" and t == last_update
            update_masks(member, gmp.sparsity(t), two_four)
        loss = member.loss(batches.next())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for f in member.factors.values():
                f.v.mul_(f.mask)  # pruned entries stay zero (momentum would move them)
        bar.set_postfix(loss=f"{loss.item():.3e}")
    if gmp is not None and steps == 0:  # no training: one-shot magnitude pruning of the SVD init
        update_masks(member, cfg.sparsity, cfg.structure == "2:4")
    final = member.full_loss()
    return {
        "layer": member.layer,
        "start_loss": start,
        "one_shot_pruned_loss": pruned,
        "final_loss": final,
        "sparsity": member.sparsity(),
        "target_sparsity": cfg.sparsity,
        "schedule_sparsity": gmp.reached() if gmp else 0.0,
        "steps": steps,
    }


def train_u_jointly(members: list[Member], basis: nn.Linear, method: FiPS) -> dict[str, Any]:
    """Train U alone on the mean of every member's loss, the V and masks fixed."""
    cfg = method.cfg
    steps = cfg.joint_steps or cfg.steps
    for m in members:
        for f in m.factors.values():
            f.v.requires_grad_(False)
    opt, sched = optimizer_for([basis.weight], cfg, steps)
    streams = [
        Batches(m.x.shape[0], cfg.batch_tokens, cfg.seed + 7919 + m.layer, m.x.device)
        for m in members
    ]
    before = [m.full_loss() for m in members]
    bar = tqdm(
        range(steps),
        desc=f"fips: joint U {members[0].layer}-{members[-1].layer}",
        unit="step",
        leave=False,
    )
    for _ in bar:
        loss = sum(m.loss(b.next()) for m, b in zip(members, streams, strict=True)) / len(members)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3e}")
    return {
        "steps": steps,
        "losses_before": before,
        "losses_after": [m.full_loss() for m in members],
    }


@torch.no_grad()
def targets(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original MLP's outputs on ``x`` (chunked)."""
    return torch.cat([mlp(x[s : s + EVAL_CHUNK]) for s in range(0, x.shape[0], EVAL_CHUNK)])


def training_inputs(
    inputs: MLPInputs, layer: int, method: FiPS, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    x = inputs.inputs[layer]
    cap = method.cfg.max_tokens
    if cap is not None and cap < x.shape[0]:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(method.cfg.seed))
        x = x[keep[:cap].sort().values]
    return x.to(device, dtype)


def compress_group(
    model: nn.Module,
    family: FamilyAdapter,
    plan: FipsGroupPlan,
    inputs: MLPInputs,
    method: FiPS,
    device: torch.device,
) -> dict[str, Any]:
    """SVD-initialise, train and install one block group; returns its record entry."""
    layers = family.layers(model)
    dtype = family.weight(layers[plan.layers[0]], plan.kinds[0]).dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32  # the training dtype
    oriented, transposed = [], []
    for layer in plan.layers:
        for kind in plan.kinds:
            m, t = orient(family.weight(layers[layer], kind).detach().to(device), plan.d)
            oriented.append(m)
            transposed.append(t)
    u, slices = svd_init(oriented, plan.rank)
    basis = basis_linear(u.to(work), work)
    members: list[Member] = []
    for layer in plan.layers:
        mlp = family.mlp(layers[layer]).to(work)
        x = training_inputs(inputs, layer, method, device, work)
        members.append(Member(layer, mlp, x, targets(mlp, x)))
    it = iter(zip(slices, transposed, strict=True))
    for member in members:
        for kind in plan.kinds:
            v, t = next(it)
            bias = family.bias(layers[member.layer], kind)
            factor = MaskedFactor(
                basis,
                v.to(work),
                t,
                None if bias is None else bias.detach().to(work),
            )
            family.set_module(layers[member.layer], kind, factor)
            member.factors[kind] = factor
    group = f"{plan.layers[0]}-{plan.layers[-1]}"
    at_init = [m.full_loss() for m in members]  # every member at the SVD init, before training
    mlps = []
    for member, initial in zip(members, at_init, strict=True):
        desc = f"fips: layer {member.layer} (group {group})"
        entry = {"initial_loss": initial, **train_member(member, basis, method, desc)}
        mlps.append(entry)
        log.info(
            "FiPS layer %d: MSE %.4e at SVD init (%s pruned once) -> %.4e trained, sparsity %.4f",
            member.layer,
            entry["initial_loss"],
            "n/a"
            if entry["one_shot_pruned_loss"] is None
            else f"{entry['one_shot_pruned_loss']:.4e}",
            entry["final_loss"],
            entry["sparsity"],
        )
    joint = train_u_jointly(members, basis, method) if method.cfg.u_update == "joint" else None
    for entry, member in zip(mlps, members, strict=True):
        entry["group_final_loss"] = member.full_loss()  # after every member (and the joint pass)
    install(model, family, plan, members, basis, dtype, method.cfg.structure)
    return {"mlps": mlps, "joint": joint}


def install(
    model: nn.Module,
    family: FamilyAdapter,
    plan: FipsGroupPlan,
    members: list[Member],
    basis: nn.Linear,
    dtype: torch.dtype,
    structure: str,
) -> None:
    """Replace the trained factors by ``SparseFactorLinear`` in ``dtype``; U registered once."""
    registry = shared_bases(model)
    registry[plan.basis_key] = basis.to(dtype).requires_grad_(True)
    layers = family.layers(model)
    for member in members:
        for kind, f in member.factors.items():
            v = (f.v.detach() * f.mask).to(dtype)
            bias = None if f.bias is None else f.bias.to(dtype)
            module = SparseFactorLinear.from_dense(
                registry, plan.basis_key, v, f.mask, f.transposed, bias, structure
            )
            family.set_module(layers[member.layer], kind, module)
        member.mlp.to(dtype)


def storage_report(model: nn.Module, family: FamilyAdapter) -> dict[str, Any]:
    """Parameters (nonzeros plus U once) and bytes (values, bitmasks, U) of the FiPS modules."""
    seen_params: set[int] = set()
    seen_bytes: set[int] = set()
    params = nbytes = index_bytes = nnz = dense = dense_bytes = 0
    for _, module in compressed_modules(model):
        if not isinstance(module, SparseFactorLinear):
            continue
        params += module.kept_parameters(seen_params)
        nbytes += module.storage_bytes(seen_bytes)
        index_bytes += module.mask_bits.numel()
        nnz += module.nnz
        dense += module.d_in * module.d_out
        dense_bytes += module.d_in * module.d_out * module.values.element_size()
    return {
        "params": params,
        "nonzeros": nnz,
        "bytes": nbytes,
        "index_bytes": index_bytes,
        "dense_params": dense,
        "dense_bytes": dense_bytes,
        "params_ratio": 1.0 - params / dense if dense else math.nan,
        "bytes_ratio": 1.0 - nbytes / dense_bytes if dense_bytes else math.nan,
    }
