"""Rank plans: which layers form a group for each projection kind, and each group's rank.

A plan is computed from shapes and the target ratio only, before any statistics or decomposition,
so the achieved compression can be checked before the heavy work (docs/architecture.md §5.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.linalg.factorization import shared_rank
from basis_sharing.models.families import FamilyAdapter

# The rank of a smaller last group: the nominal k of a full group (the paper's code) or its own.
REMAINDER_RANKS = ("nominal", "own")


@dataclass(frozen=True)
class GroupPlan:
    """One factorisation: the layers of a group sharing one basis for projection ``kind``."""

    kind: str
    index: int  # group number within its kind
    layers: tuple[int, ...]
    d_in: int
    d_out: int
    rank: int

    @property
    def shared(self) -> bool:
        return len(self.layers) > 1

    @property
    def members(self) -> list[tuple[int, str]]:
        """The (layer, kind) projections it factorises."""
        return [(layer, self.kind) for layer in self.layers]

    @property
    def adapter_slots(self) -> tuple[tuple[str, str], ...]:
        """What its modules offer an adapter (``CompressedLinear.adapter_slots``)."""
        slots = (("coefficient", "coefficient"),)
        return slots if self.shared else (*slots, ("basis", "private_basis"))

    @property
    def adapter_shared_basis(self) -> bool:
        """Whether an adapter may sit on its shared basis (its modules' ``shared_basis_key``)."""
        return self.shared

    @property
    def basis_key(self) -> str | None:
        """The shared basis's name in ``model.shared_bases`` (None: a private factorisation)."""
        return f"{self.kind}_g{self.index}" if self.shared else None

    @property
    def params(self) -> int:
        """Weights kept: the basis once, one coefficient matrix per member."""
        return self.d_in * self.rank + len(self.layers) * self.rank * self.d_out

    @property
    def dense_params(self) -> int:
        return len(self.layers) * self.d_in * self.d_out

    @property
    def full_rank(self) -> int:
        return min(self.d_in, len(self.layers) * self.d_out)

    def as_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}


def layer_groups(n_layers: int, group_size: int) -> list[tuple[int, ...]]:
    """Consecutive groups from layer 0; the leftover layers form one last, smaller group."""
    if group_size < 1:
        raise ConfigError(f"method.group_size={group_size} must be >= 1.")
    return [tuple(range(s, min(s + group_size, n_layers))) for s in range(0, n_layers, group_size)]


def narrow_kinds(family: FamilyAdapter, model: nn.Module) -> tuple[str, ...]:
    """The GQA rule: kinds of ``family.private_when_narrow`` whose d_out <= d_in / 2.

    Shapes are read from the first decoder layer (every family here has equal layers); a model on
    the meta device works too. On GQA models k/v are n_kv_heads * head_dim wide; the paper keeps
    Mistral's k/v private, and sharing them was measurably worse on SmolLM2.
    """
    layer = family.layers(model)[0]
    narrow = []
    for kind in family.private_when_narrow:
        d_in, d_out = family.shape(layer, kind)
        if 2 * d_out <= d_in:
            narrow.append(kind)
    return tuple(narrow)


def resolve_kinds(
    family: FamilyAdapter,
    shared: Sequence[str] | None,
    private: Sequence[str] | None,
    narrow: Sequence[str] = (),
    compressed: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Shared and private kinds: the family's paper defaults unless the config names them.

    Naming only one list makes every other compressed kind fall in the other list. ``narrow``
    (from ``narrow_kinds``) moves those kinds to private in the defaults only: kinds the config
    names always win. ``compressed`` (``method.kinds``; None: every kind of the family) are the
    kinds the two lists split; the others stay dense.
    """
    kinds = tuple(k for k in family.kinds if compressed is None or k in compressed)
    for name in list(shared or []) + list(private or []) + list(narrow) + list(compressed or []):
        family.projection(name)  # unknown kinds fail here, listing the valid ones
    if shared is None and private is None:
        if compressed is None and not set(narrow) & set(family.shared):
            return family.shared, family.private
        return (
            tuple(k for k in family.shared if k not in narrow and k in kinds),
            tuple(k for k in kinds if k in family.private or k in narrow),
        )
    if shared is None:
        shared = [k for k in kinds if k not in private]
    if private is None:
        private = [k for k in kinds if k not in shared]
    overlap = set(shared) & set(private)
    missing = set(kinds) - set(shared) - set(private)
    outside = (set(shared) | set(private)) - set(kinds)
    if overlap or missing or outside:
        what = f"the {family.name} projections" if compressed is None else "method.kinds"
        raise ConfigError(
            f"method.shared={list(shared)} and method.private={list(private)} must split "
            f"{what} {list(kinds)} exactly "
            f"(in both: {sorted(overlap) or 'none'}, in neither: {sorted(missing) or 'none'}"
            + (f", not compressed: {sorted(outside)}" if outside else "")
            + ")."
        )
    return tuple(k for k in kinds if k in shared), tuple(k for k in kinds if k in private)


def plan_groups(
    model: nn.Module,
    family: FamilyAdapter,
    ratio: float,
    group_size: int,
    shared: Sequence[str],
    private: Sequence[str],
    remainder_rank: str = "nominal",
) -> list[GroupPlan]:
    """Groups and ranks for every projection kind (docs/methods.md §3.2, §3.6).

    Shared kinds use consecutive groups of ``group_size`` layers and k from the budget rule with
    n = group_size; private kinds use one group per layer (n = 1); kinds in neither stay dense
    (no plan). A smaller last group keeps the
    nominal k as the paper's code does (``remainder_rank="nominal"``) or gets k for its own size
    (``"own"``).
    """
    if remainder_rank not in REMAINDER_RANKS:
        raise unknown_choice("method.remainder_rank", remainder_rank, REMAINDER_RANKS)
    layers = family.layers(model)
    plans: list[GroupPlan] = []
    for kind in (k for k in family.kinds if k in shared or k in private):
        size = group_size if kind in shared else 1
        for index, members in enumerate(layer_groups(len(layers), size)):
            d_in, d_out = family.shape(layers[members[0]], kind)
            n = len(members) if remainder_rank == "own" else size
            rank = shared_rank(d_in, d_out, n, ratio)
            if rank < 1:
                raise ConfigError(
                    f"ratio={ratio} leaves no basis vector for {kind} ({d_in} x {d_out})."
                )
            plans.append(
                GroupPlan(
                    kind, index, members, d_in, d_out, min(rank, min(d_in, len(members) * d_out))
                )
            )
    return plans


def planned_params(plans: Sequence[GroupPlan], dense_total: int | None = None) -> dict[str, int]:
    """Projection weights the plans keep; projections no plan covers stay dense and count whole.

    Args:
        dense_total: weights of every projection before compression (None: only the planned ones).
    """
    covered = sum(p.dense_params for p in plans)
    dense = covered if dense_total is None else dense_total
    return {"kept": sum(p.params for p in plans) + dense - covered, "dense": dense}
