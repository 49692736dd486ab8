"""Which modules of a compressed model a LoRA adapter is put on (docs/methods.md §6.1).

Every candidate is a plain ``nn.Linear`` (or GPT-2 ``Conv1D``) reached by exactly one name:

- ``coefficient``: the per-layer coefficient of a compressed projection
  (``model.layers.3.self_attn.q_proj.coefficient``);
- ``dense``: a projection left uncompressed (``model.layers.3.self_attn.q_proj``; every
  projection under ``method=dense``);
- ``private_basis``: the basis of a private (one-layer) factorisation (``...q_proj.basis``);
- ``shared_basis``: a basis shared by a group, registered once in ``model.shared_bases``
  (``shared_bases.q_g1``). Its members look it up there at call time, so the one adapter on it
  is seen by every member, and merging it changes the basis once.

``finetune.targets`` selects among them: ``paper`` (the q and v coefficients, or GPT-2's fused
attention: what PEFT's default target names hit in the published code), ``coefficients`` (every
per-layer coefficient and dense projection), ``shared_bases``, ``all``, or a list of
``fnmatch`` patterns over the candidates' names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from torch import nn

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.modules import SHARED_BASES, CompressedLinear

if TYPE_CHECKING:
    from basis_sharing.methods.plan import GroupPlan

TARGET_CHOICES = ("paper", "coefficients", "shared_bases", "all")
PAPER_KINDS = ("q", "v", "attn")  # PEFT's default LoRA targets: q_proj, v_proj; GPT-2 c_attn
PER_LAYER_ROLES = ("coefficient", "dense")
SHOWN = 12  # candidate names listed in an error message


@dataclass(frozen=True)
class Candidate:
    """A module an adapter can sit on."""

    name: str  # qualified name in the (un-wrapped) model
    role: str  # coefficient / dense / private_basis / shared_basis
    kind: str  # projection kind (q, v, attn, ...)
    layers: tuple[int, ...]  # the decoder layers that compute with it


def candidates(model: nn.Module, family: FamilyAdapter) -> list[Candidate]:
    """Every module an adapter can sit on, each once, in layer order then registry order."""
    found: list[Candidate] = []
    shared_users: dict[str, list[int]] = {}
    shared_kind: dict[str, str] = {}
    for i, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            name = f"{family.layers_path}.{i}.{family.projection(kind).path}"
            module = family.module(layer, kind)
            if not isinstance(module, CompressedLinear):
                found.append(Candidate(name, "dense", kind, (i,)))
                continue
            for child, role in module.adapter_slots():
                found.append(Candidate(f"{name}.{child}", role, kind, (i,)))
            if module.shared_basis_key is not None:
                shared_users.setdefault(module.shared_basis_key, []).append(i)
                shared_kind[module.shared_basis_key] = kind
    registry = getattr(model, SHARED_BASES, None)
    for key in registry.keys() if registry is not None else ():
        if key in shared_users:
            found.append(
                Candidate(
                    f"{SHARED_BASES}.{key}",
                    "shared_basis",
                    shared_kind[key],
                    tuple(shared_users[key]),
                )
            )
    return found


def planned_candidates(plans: Sequence[GroupPlan], family: FamilyAdapter, n_layers: int):
    """The candidates the compressed model will have, from the method's rank plan alone.

    Equal to ``candidates`` of the model that ``plans`` produce (tests/test_finetune_targets.py), so
    ``finetune.targets`` is checked before any weight is loaded. ``plans`` empty: a dense model.
    """
    planned = {member: p for p in plans for member in p.members}
    found: list[Candidate] = []
    for i in range(n_layers):
        for kind in family.kinds:
            name = f"{family.layers_path}.{i}.{family.projection(kind).path}"
            plan = planned.get((i, kind))
            if plan is None:
                found.append(Candidate(name, "dense", kind, (i,)))
                continue
            for child, role in plan.adapter_slots:
                found.append(Candidate(f"{name}.{child}", role, kind, (i,)))
    found += [
        Candidate(f"{SHARED_BASES}.{p.basis_key}", "shared_basis", p.kind, tuple(p.layers))
        for p in plans
        if p.adapter_shared_basis
    ]
    return found


def check_targets(targets: Any) -> None:
    """A choice name, or a non-empty list of non-empty patterns (the config alone)."""
    if isinstance(targets, str):
        if targets not in TARGET_CHOICES:
            raise unknown_choice("finetune.targets", targets, list(TARGET_CHOICES))
        return
    if not isinstance(targets, Sequence) or not targets:
        raise ConfigError(
            f"finetune.targets={targets!r}: use one of {', '.join(TARGET_CHOICES)} or a "
            "non-empty list of module-name patterns, e.g. ['*.q_proj.coefficient']."
        )
    bad = [p for p in targets if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ConfigError(f"finetune.targets: patterns must be non-empty strings, got {bad!r}.")


def select(found: list[Candidate], targets: Any) -> list[Candidate]:
    """The candidates ``targets`` names.

    Raises:
        ConfigError: a choice or a pattern that matches no module of this model; the message
            lists what exists.
    """
    if isinstance(targets, str):
        if targets == "paper":
            kinds = {c.kind for c in found} & set(PAPER_KINDS)
            chosen = [c for c in found if c.role in PER_LAYER_ROLES and c.kind in kinds]
        elif targets == "coefficients":
            chosen = [c for c in found if c.role in PER_LAYER_ROLES]
        elif targets == "shared_bases":
            chosen = [c for c in found if c.role == "shared_basis"]
        else:
            chosen = list(found)
        if not chosen:
            raise ConfigError(
                f"finetune.targets={targets} matches no module of this model: it has "
                f"{describe_roles(found)}. Choose another finetune.targets."
            )
        return chosen
    chosen_names: set[str] = set()
    for pattern in targets:
        hits = {c.name for c in found if fnmatchcase(c.name, pattern)}
        if not hits:
            names = [c.name for c in found]
            shown = ", ".join(names[:SHOWN]) + (
                f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
            )
            raise ConfigError(
                f"finetune.targets pattern {pattern!r} matches no module an adapter can sit on. "
                f"The modules are: {shown}; shared bases: "
                f"{[c.name for c in found if c.role == 'shared_basis'] or 'none'}."
            )
        chosen_names |= hits
    return [c for c in found if c.name in chosen_names]


def describe_roles(found: list[Candidate]) -> str:
    counts: dict[str, int] = {}
    for c in found:
        counts[c.role] = counts.get(c.role, 0) + 1
    return ", ".join(f"{n} {role}" for role, n in counts.items()) or "no projection"


def summary(chosen: list[Candidate]) -> dict[str, Any]:
    """How many adapters sit on which modules (the record's ``finetune.adapters``)."""
    by_role: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for c in chosen:
        by_role[c.role] = by_role.get(c.role, 0) + 1
        by_kind[c.kind] = by_kind.get(c.kind, 0) + 1
    return {
        "count": len(chosen),
        "by_role": by_role,
        "by_kind": by_kind,
        "shared_bases": {c.name: list(c.layers) for c in chosen if c.role == "shared_basis"},
        "modules": [c.name for c in chosen],
    }
