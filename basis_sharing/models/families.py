"""Model-family adapters: where a family keeps its decoder layers and projections.

Families are data, not branches (docs/architecture.md §5.2): each adapter lists, per projection
kind, its attribute path inside a decoder layer, the activation it reads, and its weight layout.
Every other module asks the adapter instead of testing ``model_type``.

Orientation (docs/methods.md §1.1): a projection is y = x W with W of shape (d_in, d_out). An
``nn.Linear`` stores W^T, GPT-2's ``Conv1D`` stores W itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from basis_sharing.errors import unknown_choice
from basis_sharing.modules.surgery import replace_leaf

# The activations a projection can read. Projections reading the same one share calibration
# statistics (q/k/v read the attention input, up/gate the MLP input).
ATTN_IN, ATTN_OUT, MLP_IN, MLP_HIDDEN = "attn_in", "attn_out", "mlp_in", "mlp_hidden"


@dataclass(frozen=True)
class Projection:
    """One projection kind of a decoder layer.

    Attributes:
        kind: short name used in configs (q, k, v, o, up, gate, down; GPT-2's fused c_attn is attn).
        path: dotted attribute path from the decoder layer to the module.
        input: which activation it reads (one of ATTN_IN, ATTN_OUT, MLP_IN, MLP_HIDDEN).
        layout: "linear" (weight stored (d_out, d_in)) or "conv1d" (weight stored (d_in, d_out)).
    """

    kind: str
    path: str
    input: str
    layout: str = "linear"


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a model family keeps its layers and projections, and the paper's sharing defaults."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    projections: tuple[Projection, ...]
    shared: tuple[str, ...]  # kinds sharing one basis per layer group (docs/methods.md §3.3)
    private: tuple[str, ...]  # kinds with one basis per layer
    # The GQA rule: these kinds become private by default when their output is at most half as
    # wide as their input (grouped-query k/v). Applied with the layer shapes where the defaults
    # are resolved (basis_sharing.methods.plan.resolve_kinds), so MHA models keep sharing them.
    private_when_narrow: tuple[str, ...] = ()
    # The decoder layer's MLP module (input: the normalised residual, output: what is added back)
    # for methods that reconstruct MLP outputs (FiPS); None where the layer computes its MLP
    # inline (OPT's fc1 -> activation -> fc2 sit in the decoder layer's own forward).
    mlp_path: str | None = "mlp"

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.projections)

    def projection(self, kind: str) -> Projection:
        for p in self.projections:
            if p.kind == kind:
                return p
        raise unknown_choice(f"projection kind for family {self.name}", kind, self.kinds)

    def kinds_by_input(self) -> dict[str, tuple[str, ...]]:
        """Projection kinds grouped by the activation they read, in layer order."""
        groups: dict[str, list[str]] = {}
        for p in self.projections:
            groups.setdefault(p.input, []).append(p.kind)
        return {k: tuple(v) for k, v in groups.items()}

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``, in order."""
        return _get_path(model, self.layers_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP module of ``layer`` (x -> its MLP output)."""
        if self.mlp_path is None:
            raise ValueError(f"family {self.name} has no MLP module (its layers compute it inline)")
        return _get_path(layer, self.mlp_path)

    def module(self, layer: nn.Module, kind: str) -> nn.Module:
        return _get_path(layer, self.projection(kind).path)

    def set_module(self, layer: nn.Module, kind: str, new: nn.Module) -> None:
        """Replace the projection leaf ``kind`` of ``layer`` by ``new`` (surgery at the leaf)."""
        replace_leaf(layer, self.projection(kind).path, new)

    def weight(self, layer: nn.Module, kind: str) -> torch.Tensor:
        """W of shape (d_in, d_out) for y = x W, as a view of the stored weight."""
        module = self.module(layer, kind)
        if self.projection(kind).layout == "conv1d":
            return module.weight
        return module.weight.T

    def bias(self, layer: nn.Module, kind: str) -> torch.Tensor | None:
        return getattr(self.module(layer, kind), "bias", None)

    def shape(self, layer: nn.Module, kind: str) -> tuple[int, int]:
        """(d_in, d_out) of projection ``kind``."""
        d_in, d_out = self.weight(layer, kind).shape
        return int(d_in), int(d_out)


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_LLAMA_PROJECTIONS = (
    Projection("q", "self_attn.q_proj", ATTN_IN),
    Projection("k", "self_attn.k_proj", ATTN_IN),
    Projection("v", "self_attn.v_proj", ATTN_IN),
    Projection("o", "self_attn.o_proj", ATTN_OUT),
    Projection("up", "mlp.up_proj", MLP_IN),
    Projection("gate", "mlp.gate_proj", MLP_IN),
    Projection("down", "mlp.down_proj", MLP_HIDDEN),
)

# LLaMA-1/2 are MHA (k/v square) and share k/v; GQA checkpoints of this layout (SmolLM2, Llama-3)
# have narrow k/v, which the GQA rule keeps private.
LLAMA = FamilyAdapter(
    name="llama",
    model_types=("llama",),
    layers_path="model.layers",
    projections=_LLAMA_PROJECTIONS,
    shared=("q", "k", "v", "up", "gate"),
    private=("o", "down"),
    private_when_narrow=("k", "v"),
)

# Llama-3 / 3.1: LLaMA's module layout (GQA with 8 KV heads; the llama3 RoPE scaling lives in the
# attention, which transformers handles). Its model_type is "llama", so auto-detection keeps
# giving LLAMA; this adapter is chosen by name (model.family=llama3) so records say which it is.
LLAMA3 = dataclasses.replace(LLAMA, name="llama3")

# GQA: k/v have d_out = n_kv_heads * head_dim; the paper keeps them private.
MISTRAL = FamilyAdapter(
    name="mistral",
    model_types=("mistral",),
    layers_path="model.layers",
    projections=_LLAMA_PROJECTIONS,
    shared=("q", "up", "gate"),
    private=("k", "v", "o", "down"),
    private_when_narrow=("k", "v"),
)

# Qwen2 / Qwen2.5: LLaMA's layout with biases on q, k and v (carried by the coefficient modules)
# and GQA k/v.
QWEN2 = FamilyAdapter(
    name="qwen2",
    model_types=("qwen2",),
    layers_path="model.layers",
    projections=_LLAMA_PROJECTIONS,
    shared=("q", "k", "v", "up", "gate"),
    private=("o", "down"),
    private_when_narrow=("k", "v"),
)

# Gemma-2: LLaMA's projection names; its extra pre/post feed-forward norms, tied embeddings, and
# attention / final-logit soft-capping sit outside the projections and are left untouched.
# q's output (heads x head_dim) need not equal the hidden size (2048 vs 2304 in Gemma-2-2B).
GEMMA2 = FamilyAdapter(
    name="gemma2",
    model_types=("gemma2",),
    layers_path="model.layers",
    projections=_LLAMA_PROJECTIONS,
    shared=("q", "k", "v", "up", "gate"),
    private=("o", "down"),
    private_when_narrow=("k", "v"),
)

OPT = FamilyAdapter(
    name="opt",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    projections=(
        Projection("q", "self_attn.q_proj", ATTN_IN),
        Projection("k", "self_attn.k_proj", ATTN_IN),
        Projection("v", "self_attn.v_proj", ATTN_IN),
        Projection("o", "self_attn.out_proj", ATTN_OUT),
        Projection("up", "fc1", MLP_IN),
        Projection("down", "fc2", MLP_HIDDEN),
    ),
    shared=("q", "k", "v", "up"),
    private=("o", "down"),
    mlp_path=None,
)

# GPT-2's released config shares W_O too, against the paper's own rule (docs/methods.md §3.3, §8);
# we follow the released config so Table 5 is comparable, and say so.
GPT2 = FamilyAdapter(
    name="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    projections=(
        Projection("attn", "attn.c_attn", ATTN_IN, "conv1d"),
        Projection("o", "attn.c_proj", ATTN_OUT, "conv1d"),
        Projection("up", "mlp.c_fc", MLP_IN, "conv1d"),
        Projection("down", "mlp.c_proj", MLP_HIDDEN, "conv1d"),
    ),
    shared=("attn", "up", "o"),
    private=("down",),
)

# Auto-detection takes the first adapter listing a model_type, so LLAMA precedes LLAMA3.
FAMILIES: dict[str, FamilyAdapter] = {
    f.name: f for f in (LLAMA, LLAMA3, MISTRAL, QWEN2, GEMMA2, OPT, GPT2)
}


def get_family(name: str) -> FamilyAdapter:
    if name not in FAMILIES:
        raise unknown_choice("model family", name, list(FAMILIES))
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> FamilyAdapter:
    """The adapter for a transformers ``config.model_type``."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted({t for f in FAMILIES.values() for t in f.model_types})
    raise unknown_choice("model_type (no family adapter)", model_type, supported)


def dense_projection_weights(
    model: nn.Module, family: FamilyAdapter, kinds: tuple[str, ...] | None = None
) -> int:
    """What the projections (of ``kinds``; None: every kind) hold uncompressed: sum of d_in d_out.

    Read from the shapes alone, so it works on the meta device and lives with the adapter: the
    methods (their planned parameters) and the evaluation (the achieved ratio) both need it.
    """
    total = 0
    for layer in family.layers(model):
        for kind in family.kinds if kinds is None else kinds:
            d_in, d_out = family.shape(layer, kind)
            total += d_in * d_out
    return total
