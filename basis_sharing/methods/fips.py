"""FiPS: fine-grained parameter sharing (docs/methods.md §9).

The MLPs of a group of blocks share one dense basis U; each MLP matrix keeps a sparse factor V_j,
M_j ~ U V_j with every matrix oriented d x w (``linalg/fips.py``). U and the V are initialised
by the thin SVD of the group's concatenated matrices, with the rank the parameter budget allows
for the real shapes, and then each MLP, one at a time in layer order, is trained to reproduce the
original MLP's outputs on the original MLP's calibration inputs while gradual magnitude pruning
takes its V to the target sparsity (``methods/fips_train.py``). Attention stays dense.

``ratio`` is the fraction of the MLP weights removed (``ratio_of=kinds``), or of every decoder
projection (``ratio_of=decoder``: the MLP then removes ratio x all / MLP of its own, so FiPS can be
compared with the other methods at one total budget). The record gives both ratios, and the bytes
of the sparse storage (values plus a bitmask) besides the parameter count (nonzeros plus U once
per group, the paper's rule).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.fips import fips_rank, kept_entries
from basis_sharing.linalg.pruning import SCHEDULES, STRUCTURES
from basis_sharing.methods.plan import layer_groups, planned_params
from basis_sharing.methods.registry import (
    CompressionContext,
    CompressionMethod,
    MethodConfig,
    register_method,
)
from basis_sharing.models.families import (
    MLP_HIDDEN,
    MLP_IN,
    FamilyAdapter,
    dense_projection_weights,
)

log = logging.getLogger(__name__)

RATIO_OF = ("kinds", "decoder")
U_UPDATES = ("sequential", "joint")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class FipsMethodConfig(MethodConfig):
    """FiPS (docs/methods.md §9); the defaults are the released Gemma-2-2B training settings."""

    kinds: list[str] | None = None  # MLP kinds to compress; None: every MLP kind of the family
    group_size: int = 4  # consecutive blocks sharing U (the released LLM configs use 4)
    groups: list[list[int]] | None = None  # explicit block groups, e.g. [[0,1],[2,3,4,5]]
    ratio_of: str = "kinds"  # ratio is a fraction of the MLP weights, or of all ("decoder")
    sparsity: float = 0.0  # final sparsity of V (also used by the rank rule)
    rank_multiple: int = 1  # round r down to a multiple of it (64 for structured sparsity)
    structure: str = "none"  # "2:4": V pruned 2:4 at the last mask update (sparsity 0.5)
    # Local reconstruction, per MLP.
    steps: int = 800  # optimizer steps per MLP (Gemma-2-2B: 40 epochs x 20); 0: SVD init only
    batch_tokens: int = 8192  # tokens per mini-batch (shuffled; Gemma-2-2B: 8192)
    max_tokens: int | None = None  # train on at most this many calibration tokens; None: all
    optimizer: str = "adamw"  # or "sgd" (the Llama-3.1-8B preset)
    lr: float = 1e-5
    lr_min: float = 1e-6  # cosine schedule from lr to lr_min over the steps
    weight_decay: float = 0.1
    momentum: float = 0.0  # SGD only
    # Gradual magnitude pruning of V (global over one MLP's V slices).
    schedule: str = "exact"  # or "released": the released formula (stops short of the target)
    initial_sparsity: float | None = None  # from step 0; None: sparsity x 0.05 / 0.75 (released)
    accel_sparsity: float | None = None  # at t_accel; None: sparsity x 2/3 (released 0.5 / 0.75)
    t_accel: float = 0.4  # fractions of the steps
    t_end: float = 0.75
    delta_t: int = 50  # steps between mask updates
    u_update: str = "sequential"  # "joint": a final pass trains U on all the group's MLPs
    joint_steps: int | None = None  # steps of the joint pass; None: ``steps``
    seed: int = 0


@dataclass(frozen=True)
class FipsGroupPlan:
    """One block group: its layers, the MLP kinds they factorise together, the rank of U."""

    index: int
    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    d: int  # the model dimension (rows of every oriented matrix)
    widths: tuple[int, ...]  # the long side of each kind's matrix, in ``kinds`` order
    rank: int
    sparsity: float

    @property
    def basis_key(self) -> str:
        return f"mlp_g{self.index}"

    @property
    def members(self) -> list[tuple[int, str]]:
        return [(layer, kind) for layer in self.layers for kind in self.kinds]

    @property
    def adapter_slots(self) -> tuple[tuple[str, str], ...]:
        return ()  # U and the sparse V are no plain Linear: LoRA adapts the dense attention only

    @property
    def adapter_shared_basis(self) -> bool:
        return False  # down reads U transposed, so an adapter on it would miss that path

    def mlp_entries(self) -> int:
        """Entries of one MLP's V slices (pruned together)."""
        return self.rank * sum(self.widths)

    @property
    def params(self) -> int:
        """U once, plus every MLP's kept V entries (the paper's count)."""
        return self.d * self.rank + len(self.layers) * kept_entries(
            self.mlp_entries(), self.sparsity
        )

    @property
    def dense_params(self) -> int:
        return len(self.layers) * self.d * sum(self.widths)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "layers": list(self.layers),
            "kinds": list(self.kinds),
            "d": self.d,
            "widths": list(self.widths),
            "rank": self.rank,
            "sparsity": self.sparsity,
            "basis_key": self.basis_key,
        }


def mlp_kinds(family: FamilyAdapter) -> tuple[str, ...]:
    return tuple(p.kind for p in family.projections if p.input in (MLP_IN, MLP_HIDDEN))


def check_fraction(key: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value < high:
        raise ConfigError(f"method.{key}={value} must be in [{low}, {high}).")


@register_method("fips", schema=FipsMethodConfig)
class FiPS(CompressionMethod):
    label = "FiPS"
    needs_calibration = True
    stats_needed = frozenset({"mlp_inputs"})
    supports_sequential = False  # trains with the group's original weights on the device

    # ---- settings ------------------------------------------------------------------------
    def check_config(self, family: FamilyAdapter | None) -> None:
        cfg = self.cfg
        for key, choices in (
            ("ratio_of", RATIO_OF),
            ("u_update", U_UPDATES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("structure", STRUCTURES),
        ):
            if cfg[key] not in choices:
                raise unknown_choice(f"method.{key}", cfg[key], list(choices))
        check_fraction("sparsity", cfg.sparsity)
        for key in ("initial_sparsity", "accel_sparsity"):
            if cfg[key] is not None:
                check_fraction(key, cfg[key])
        initial, accel = self.gmp_levels()
        if cfg.sparsity > 0 and not initial <= accel <= cfg.sparsity:
            raise ConfigError(
                f"method.initial_sparsity ({initial}) <= method.accel_sparsity ({accel}) <= "
                f"method.sparsity ({cfg.sparsity}) must hold."
            )
        if not 0.0 <= cfg.t_accel <= cfg.t_end <= 1.0:
            raise ConfigError(
                f"method.t_accel={cfg.t_accel} and method.t_end={cfg.t_end} are fractions of the "
                "steps with 0 <= t_accel <= t_end <= 1."
            )
        if cfg.structure == "2:4" and cfg.sparsity != 0.5:
            raise ConfigError(
                f"method.structure=2:4 keeps 2 of every 4 entries: set method.sparsity=0.5, "
                f"not {cfg.sparsity}."
            )
        for key in ("group_size", "rank_multiple", "batch_tokens", "delta_t"):
            if cfg[key] < 1:
                raise ConfigError(f"method.{key}={cfg[key]} must be >= 1.")
        if cfg.steps < 0:
            raise ConfigError(f"method.steps={cfg.steps} must be >= 0 (0: the SVD init only).")
        for key in ("max_tokens", "joint_steps"):
            if cfg[key] is not None and cfg[key] < 1:
                raise ConfigError(f"method.{key}={cfg[key]} must be >= 1 (or null).")
        if not (cfg.lr > 0 and cfg.lr_min >= 0 and cfg.lr_min <= cfg.lr):
            raise ConfigError(
                f"method.lr={cfg.lr} must be > 0 and method.lr_min={cfg.lr_min} in [0, lr]."
            )
        if cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
            raise ConfigError(
                f"method.weight_decay={cfg.weight_decay} must be >= 0 and method.momentum="
                f"{cfg.momentum} in [0, 1)."
            )
        if family is not None:
            self.kinds(family)

    def gmp_levels(self) -> tuple[float, float]:
        """(initial, accel) sparsities: as set, or the released 0.05 / 0.5 of a 0.75 target."""
        s = self.cfg.sparsity
        initial = self.cfg.initial_sparsity
        accel = self.cfg.accel_sparsity
        return (
            s * 0.05 / 0.75 if initial is None else initial,
            s * 2.0 / 3.0 if accel is None else accel,
        )

    def kinds(self, family: FamilyAdapter) -> tuple[str, ...]:
        """The MLP kinds compressed, in the family's order.

        Raises:
            ConfigError: the family computes its MLP inline (OPT), or ``method.kinds`` names a
                kind that is not one of its MLP kinds.
        """
        if family.mlp_path is None:
            raise ConfigError(
                f"method=fips needs an MLP module to reconstruct, and the {family.name} family "
                "computes its MLP inside the decoder layer. Families FiPS supports: llama, "
                "llama3, mistral, qwen2, gemma2, gpt2."
            )
        mlp = mlp_kinds(family)
        chosen = mlp if self.cfg.kinds is None else tuple(self.cfg.kinds)
        for kind in chosen:
            if kind not in mlp:
                raise unknown_choice(
                    f"method.kinds (FiPS compresses MLP kinds of {family.name})", kind, list(mlp)
                )
        if len(set(chosen)) != len(chosen) or not chosen:
            raise ConfigError(f"method.kinds={list(chosen)} must name each MLP kind once.")
        return tuple(k for k in family.kinds if k in chosen)

    def budget_kinds(self, family: FamilyAdapter) -> tuple[str, ...] | None:
        return self.kinds(family) if self.cfg.ratio_of == "kinds" else None

    # ---- the plan ------------------------------------------------------------------------
    def block_groups(self, n_layers: int) -> list[tuple[int, ...]]:
        """``method.groups`` (each layer exactly once) or consecutive groups of group_size."""
        groups = self.cfg.groups
        if groups is None:
            if self.cfg.group_size > n_layers:
                raise ConfigError(
                    f"method.group_size={self.cfg.group_size} exceeds the model's {n_layers} "
                    "decoder layers."
                )
            return layer_groups(n_layers, self.cfg.group_size)
        flat = [layer for group in groups for layer in group]
        if not all(groups) or sorted(flat) != list(range(n_layers)):
            raise ConfigError(
                f"method.groups={[list(g) for g in groups]} must list each of the model's "
                f"{n_layers} decoder layers (0..{n_layers - 1}) exactly once, in non-empty groups."
            )
        return [tuple(sorted(int(layer) for layer in group)) for group in groups]

    def kinds_ratio(self, model: nn.Module, family: FamilyAdapter, ratio: float) -> float:
        """The fraction of the MLP weights to remove for the configured ``ratio``."""
        if self.cfg.ratio_of == "kinds":
            return ratio
        kinds = self.kinds(family)
        scaled = (
            ratio
            * dense_projection_weights(model, family)
            / dense_projection_weights(model, family, kinds)
        )
        if scaled >= 1.0:
            raise ConfigError(
                f"ratio={ratio} of every decoder projection would remove {scaled:.3f} of the "
                f"{'/'.join(kinds)} weights (>= 1); lower the ratio or use method.ratio_of=kinds."
            )
        return scaled

    def plan(
        self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext
    ) -> list[FipsGroupPlan]:
        """Block groups and the rank of each group's U, from the shapes and ``ctx.ratio``."""
        ratio = float(ctx.ratio)
        kinds = self.kinds(family)
        layers = family.layers(model)
        d = model_dim(family, layers[0], kinds)
        widths = tuple(_width(family, layers[0], k, d) for k in kinds)
        mlp_ratio = self.kinds_ratio(model, family, ratio)
        plans = []
        for index, members in enumerate(self.block_groups(len(layers))):
            for layer in members:
                if tuple(_width(family, layers[layer], k, d) for k in kinds) != widths:
                    raise ConfigError(f"layer {layer}'s MLP shapes differ from layer 0's")
            rank = fips_rank(
                d,
                list(widths) * len(members),
                mlp_ratio,
                self.cfg.sparsity,
                self.cfg.rank_multiple,
            )
            if rank < 1:
                raise ConfigError(
                    f"ratio={ratio} with method.sparsity={self.cfg.sparsity} leaves U no column "
                    f"for group {list(members)} (rank_multiple={self.cfg.rank_multiple})."
                )
            plans.append(FipsGroupPlan(index, members, kinds, d, widths, rank, self.cfg.sparsity))
        return plans

    def shape_plan(self, model: nn.Module, family: FamilyAdapter, ratio: float):
        ctx = CompressionContext(ratio=ratio, device=torch.device("cpu"))
        return self.plan(model, family, ctx)

    # ---- compression ---------------------------------------------------------------------
    def compress(self, model: nn.Module, family: FamilyAdapter, ctx: CompressionContext) -> dict:
        from basis_sharing.methods.fips_train import compress_group, storage_report

        plans = self.plan(model, family, ctx)
        dense_total = dense_projection_weights(model, family)
        mlp_ratio = self.kinds_ratio(model, family, float(ctx.ratio))  # dense shapes: before
        inputs = ctx.stats["mlp_inputs"]
        started = time.perf_counter()
        groups = [compress_group(model, family, plan, inputs, self, ctx.device) for plan in plans]
        return {
            "kinds": list(plans[0].kinds),
            "ratio_of": self.cfg.ratio_of,
            "mlp_ratio": mlp_ratio,
            "block_groups": [{**p.as_dict(), **g} for p, g in zip(plans, groups, strict=True)],
            "planned_params": planned_params(plans, dense_total),
            "storage": storage_report(model, family),
            "mlp_inputs": {"tokens": inputs.tokens, "bytes": inputs.nbytes()},
            "train_seconds": time.perf_counter() - started,
        }


def model_dim(family: FamilyAdapter, layer: nn.Module, kinds: Sequence[str]) -> int:
    """The model dimension: the input of the kinds reading the MLP input (up, gate, c_fc)."""
    readers = [k for k in kinds if family.projection(k).input == MLP_IN]
    if readers:
        return family.shape(layer, readers[0])[0]
    return family.shape(layer, kinds[0])[1]  # down only: its output


def _width(family: FamilyAdapter, layer: nn.Module, kind: str, d: int) -> int:
    d_in, d_out = family.shape(layer, kind)
    if d_in == d:
        return d_out
    if d_out == d:
        return d_in
    raise ConfigError(f"projection {kind} ({d_in} x {d_out}) has no side of the model dim {d}")
