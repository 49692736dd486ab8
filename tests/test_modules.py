"""Compressed module types own their facts: kept parameters, layout entry, rebuild, break-even.

A new type registered here (``ScaledLowRankLinear``) is saved, loaded, counted and checked for
its break-even rank by the existing code, which never names it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from basis_sharing.errors import ConfigError, UserError
from basis_sharing.evaluation.params import count_projection_weights, dense_projection_weights
from basis_sharing.evaluation.throughput import rank_above_break_even
from basis_sharing.models.compressed_io import (
    CompressedModelError,
    compressed_layout,
    layout_problems,
    load_compressed,
    save_compressed,
)
from basis_sharing.models.families import family_for_model_type
from basis_sharing.modules import (
    MODULE_TYPES,
    CompressedLinear,
    LowRankLinear,
    SharedBasisLinear,
    basis_linear,
    coefficient_linear,
    count_kept,
    install_factors,
    module_type,
    register_module_type,
    replace_leaf,
    shared_bases,
)
from basis_sharing.modules.factors import meta_linear

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def low_rank(d_in: int, rank: int, d_out: int, bias: bool = False, seed: int = 0) -> LowRankLinear:
    b = randn(d_out, seed=seed + 2) if bias else None
    return LowRankLinear(
        basis_linear(randn(d_in, rank, seed=seed), F64),
        coefficient_linear(randn(rank, d_out, seed=seed + 1), b, F64),
    )


def shared_group(root: nn.Module, d_in: int, rank: int, d_out: int, members: int, key: str):
    """``members`` SharedBasisLinear children of ``root`` (m0, m1, ...) on one basis ``key``."""
    registry = shared_bases(root)
    registry[key] = basis_linear(randn(d_in, rank, seed=10), F64)
    for j in range(members):
        coeff = coefficient_linear(randn(rank, d_out, seed=20 + j), randn(d_out, seed=30 + j), F64)
        setattr(root, f"m{j}", SharedBasisLinear(registry, key, coeff))
    return [getattr(root, f"m{j}") for j in range(members)]


class ScaledLowRankLinear(CompressedLinear):
    """A type unknown to the rest of the package: y = ((x B) * s) C, s a learnt (k,) scale.

    Kept weights k (d_in + 1 + d_out); k (d_in + d_out + 1) multiply-adds a token, so its
    break-even rank is d_in d_out / (d_in + d_out + 1). Registered only by the fixture below.
    """

    layout_type = "scaled_lowrank"

    def __init__(self, basis: nn.Linear, scale: nn.Parameter, coefficient: nn.Linear) -> None:
        super().__init__()
        self.basis, self.scale, self.coefficient = basis, scale, coefficient

    rank = property(lambda self: self.basis.out_features)
    d_in = property(lambda self: self.basis.in_features)
    d_out = property(lambda self: self.coefficient.out_features)
    has_bias = property(lambda self: self.coefficient.bias is not None)

    def factor_weights(self) -> list[torch.Tensor]:
        return [self.basis.weight, self.scale, self.coefficient.weight]

    def break_even_rank(self) -> float:
        return self.d_in * self.d_out / (self.d_in + self.d_out + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient(self.basis(x) * self.scale)

    @classmethod
    def from_layout(
        cls, entry: dict[str, Any], root: nn.Module, dtype: torch.dtype | None = None
    ) -> ScaledLowRankLinear:
        d_in, rank, d_out = entry["d_in"], entry["rank"], entry["d_out"]
        scale = nn.Parameter(torch.empty(rank, device="meta", dtype=dtype))
        return cls(
            meta_linear(d_in, rank, False, dtype),
            scale,
            meta_linear(rank, d_out, entry["bias"], dtype),
        )


@pytest.fixture
def scaled_type():
    register_module_type(ScaledLowRankLinear)
    yield ScaledLowRankLinear
    del MODULE_TYPES[ScaledLowRankLinear.layout_type]


def scaled_from_dense(weight: torch.Tensor, rank: int) -> ScaledLowRankLinear:
    """The rank-``rank`` SVD of W (d_in, d_out) as B = U_k, s = Sigma_k, C = V_k^T."""
    u, s, vh = torch.linalg.svd(weight.detach().to(F64), full_matrices=False)
    basis = basis_linear(u[:, :rank], F64)
    coefficient = coefficient_linear(vh[:rank], None, F64)
    return ScaledLowRankLinear(basis, nn.Parameter(s[:rank].clone()), coefficient)


# ---- kept parameters ------------------------------------------------------------------------


def test_low_rank_keeps_both_factors_without_the_bias():
    module = low_rank(12, 3, 7, bias=True)
    assert module.kept_parameters(set()) == 12 * 3 + 3 * 7  # 57; the 7 bias values are not kept
    assert (module.rank, module.d_in, module.d_out, module.has_bias) == (3, 12, 7, True)


def test_a_shared_basis_is_counted_once_over_its_group():
    members = shared_group(nn.Module(), 12, 3, 7, members=3, key="q_g0")
    seen: set[int] = set()
    assert [m.kept_parameters(seen) for m in members] == [12 * 3 + 3 * 7, 3 * 7, 3 * 7]
    assert members[2].kept_parameters(set()) == 57  # alone, it carries the basis itself


def test_dense_leaves_count_their_weight_and_a_new_type_its_own_tensors():
    assert count_kept(nn.Linear(12, 7, bias=True), set()) == 84
    assert count_kept(Conv1D(7, 12), set()) == 84  # GPT-2 layout: weight (12, 7), bias (7,)
    scaled = scaled_from_dense(randn(12, 7, seed=1), 3)
    assert count_kept(scaled, set()) == 12 * 3 + 3 + 3 * 7


# ---- layout entry -> from_layout -> load_state ----------------------------------------------


def rebuilt(root: nn.Module, entries: list[tuple[str, dict]]) -> nn.Module:
    """A fresh root whose children are rebuilt from the entries, then given root's state."""
    new_root = nn.Module()
    for name, entry in entries:
        setattr(new_root, name, module_type(entry["type"]).from_layout(entry, new_root))
    assert all(p.is_meta for p in new_root.parameters())
    new_root.load_state_dict(root.state_dict(), strict=True, assign=True)
    return new_root


def test_low_rank_entry_rebuilds_identical_outputs():
    root = nn.Module()
    root.proj = low_rank(12, 3, 7, bias=True)
    entry = root.proj.layout_entry(2, "o", root)
    assert entry == {
        "layer": 2,
        "kind": "o",
        "type": "lowrank",
        "rank": 3,
        "d_in": 12,
        "d_out": 7,
        "bias": True,
        "basis_key": None,
    }
    assert list(entry) == ["layer", "kind", "type", "rank", "d_in", "d_out", "bias", "basis_key"]
    new = rebuilt(root, [("proj", entry)])
    x = randn(5, 12, seed=3)
    assert type(new.proj) is LowRankLinear and torch.equal(new.proj(x), root.proj(x))


def test_shared_entries_rebuild_one_basis_and_identical_outputs():
    root = nn.Module()
    members = shared_group(root, 12, 3, 7, members=2, key="up_g1")
    entries = [(f"m{j}", m.layout_entry(4 + j, "up", root)) for j, m in enumerate(members)]
    assert entries[1][1] == {
        "layer": 5,
        "kind": "up",
        "type": "shared",
        "rank": 3,
        "d_in": 12,
        "d_out": 7,
        "bias": True,
        "basis_key": "up_g1",
    }
    new = rebuilt(root, entries)
    assert list(new.shared_bases) == ["up_g1"] and new.m0.basis is new.m1.basis
    x = randn(5, 12, seed=4)
    for j in range(2):
        assert torch.equal(getattr(new, f"m{j}")(x), members[j](x))


# ---- the type registry ----------------------------------------------------------------------


def test_an_unknown_type_is_refused_with_the_known_ones():
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "Unknown compressed module type 'sparse'. Valid choices: fips, lowrank, shared."
        ),
    ):
        module_type("sparse")
    family = family_for_model_type("llama")
    entry = low_rank(12, 3, 7).layout_entry(0, "q", nn.Module())
    assert layout_problems([{**entry, "type": "sparse"}], family) == [
        "layout[0]: 'type' must be one of 'fips', 'lowrank', 'shared', got 'sparse'"
    ]


def test_a_registered_type_is_listed_and_a_taken_name_refused(scaled_type):
    with pytest.raises(ConfigError, match="Valid choices: fips, lowrank, scaled_lowrank, shared."):
        module_type("sparse")

    class Impostor(ScaledLowRankLinear):
        layout_type = "lowrank"

    with pytest.raises(
        ConfigError,
        match="Module type 'lowrank' is already registered by LowRankLinear; choose another "
        "layout_type for Impostor.",
    ):
        register_module_type(Impostor)
    with pytest.raises(ConfigError, match="needs a CompressedLinear subclass, got <class 'int'>"):
        register_module_type(int)
    assert MODULE_TYPES["lowrank"] is LowRankLinear


def test_a_type_entry_lacking_its_own_keys_is_reported():
    family = family_for_model_type("llama")
    entry = low_rank(12, 3, 7).layout_entry(0, "q", nn.Module())
    del entry["basis_key"]
    assert layout_problems([entry], family) == ["layout[0]: lacks the key(s) ['basis_key']"]
    bad = {**entry, "basis_key": "q_g0", "bias": 1}
    assert layout_problems([bad], family) == [
        "layout[0]: 'bias' must be true or false, got 1",
        "layout[0]: a lowrank entry has no basis_key, got 'q_g0'",
    ]


# ---- a new type through compressed_io, params and throughput --------------------------------


def tiny_llama_with_scaled_o(rank: int):
    model = make_tiny_model("llama", dtype=F64)
    family = family_for_model_type(model.config.model_type)
    dense = dense_projection_weights(model, family)
    for layer in family.layers(model):
        family.set_module(layer, "o", scaled_from_dense(family.weight(layer, "o"), rank))
    return model, family, dense


def test_a_new_type_is_saved_loaded_and_counted_by_the_existing_code(scaled_type, tmp_path):
    model, family, dense = tiny_llama_with_scaled_o(rank=5)
    layout = compressed_layout(model, family)
    assert layout[0] == {
        "layer": 0,
        "kind": "o",
        "type": "scaled_lowrank",
        "rank": 5,
        "d_in": 64,
        "d_out": 64,
        "bias": False,
    }
    assert len(layout) == 4
    kept = dense - 4 * 64 * 64 + 4 * (64 * 5 + 5 + 5 * 64)
    assert count_projection_weights(model, family) == kept

    loaded = load_compressed(save_compressed(model, tmp_path / "scaled", family=family)).model
    o_proj = family.module(family.layers(loaded)[3], "o")
    assert type(o_proj) is ScaledLowRankLinear and o_proj.scale.dtype == F64
    ids = torch.randint(0, 320, (2, 16), generator=gen(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert count_projection_weights(loaded, family) == kept


def test_break_even_comes_from_the_module(scaled_type):
    # 64 -> 64: the two-factor break-even is 32, this type's 64 * 64 / 129 = 31.75.
    model, _, _ = tiny_llama_with_scaled_o(rank=32)
    slow = rank_above_break_even(model)
    assert [s["module"] for s in slow] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    assert slow[0] == {
        "module": "model.layers.0.self_attn.o_proj",
        "rank": 32,
        "break_even": 31.8,
        "d_in": 64,
        "d_out": 64,
    }


def test_an_unregistered_type_is_refused_before_saving(tmp_path):
    model, family, _ = tiny_llama_with_scaled_o(rank=5)
    with pytest.raises(
        CompressedModelError,
        match=r"layer 0 projection 'o': its module ScaledLowRankLinear \(type 'scaled_lowrank'\) "
        r"is not the registered compressed module type of that name.*register_module_type",
    ) as err:
        save_compressed(model, tmp_path / "out", family=family)
    assert isinstance(err.value, UserError) and not (tmp_path / "out").exists()


def test_a_basis_outside_the_registry_is_refused(tmp_path):
    model = make_tiny_model("llama", dtype=F64)
    family = family_for_model_type(model.config.model_type)
    stray = nn.ModuleDict({"q_g0": basis_linear(randn(64, 4, seed=0), F64)})
    coeff = coefficient_linear(randn(4, 64, seed=1), None, F64)
    family.set_module(family.layers(model)[1], "q", SharedBasisLinear(stray, "q_g0", coeff))
    with pytest.raises(
        CompressedModelError,
        match=r"Layer 1 projection 'q' uses basis 'q_g0' that is not in model.shared_bases",
    ):
        save_compressed(model, tmp_path / "out", family=family)


def test_an_unused_registry_basis_is_refused(tmp_path):
    model = make_tiny_model("llama", dtype=F64)
    family = family_for_model_type(model.config.model_type)
    shared_bases(model)["k_g9"] = basis_linear(randn(64, 4, seed=0), F64)
    with pytest.raises(
        CompressedModelError, match=r"holds bases that no projection uses: \['k_g9'\]"
    ):
        save_compressed(model, tmp_path / "out", family=family)


# ---- surgery --------------------------------------------------------------------------------


def test_replace_leaf_follows_module_list_indices():
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
    old = root.layers[1][0]
    new = nn.Identity()
    assert replace_leaf(root, "layers.1.0", new) is old
    assert root.layers[1][0] is new and isinstance(root.layers[0][0], nn.Linear)


def test_install_factors_shares_one_basis_and_keeps_each_bias():
    model = nn.Module()
    model.a, model.b = nn.Linear(12, 7, dtype=F64), nn.Linear(12, 7, dtype=F64)
    biases = [model.a.bias.detach().clone(), model.b.bias.detach().clone()]
    basis, coeffs = randn(12, 3, seed=1), [randn(3, 7, seed=2), randn(3, 7, seed=3)]
    installed = install_factors(model, [(model, "a"), (model, "b")], basis, coeffs, "up_g0")
    assert installed == [model.a, model.b] and list(model.shared_bases) == ["up_g0"]
    x = randn(5, 12, seed=4)
    for module, coeff, bias in zip(installed, coeffs, biases, strict=True):
        torch.testing.assert_close(module(x), x @ basis @ coeff + bias, rtol=1e-12, atol=1e-12)
    assert kept_of(model) == 12 * 3 + 2 * 3 * 7

    model.c = nn.Linear(12, 7, bias=False, dtype=F64)
    (private,) = install_factors(model, [(model, "c")], basis, coeffs[:1])
    assert type(private) is LowRankLinear and model.c is private and not private.has_bias
    torch.testing.assert_close(private(x), x @ basis @ coeffs[0], rtol=1e-12, atol=1e-12)


def kept_of(model: nn.Module) -> int:
    seen: set[int] = set()
    return sum(count_kept(m, seen) for m in (model.a, model.b))


# ---- nothing else switches on the module classes --------------------------------------------


def test_no_isinstance_on_module_classes_outside_modules():
    package = Path(__file__).resolve().parents[1] / "basis_sharing"
    names = {"LowRankLinear", "SharedBasisLinear"}
    found = []
    for path in sorted(package.rglob("*.py")):
        if "modules" in path.relative_to(package).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if used & names:
                    found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert found == []
