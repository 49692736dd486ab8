"""Family adapters, checked against tiny in-code models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from basis_sharing.errors import ConfigError
from basis_sharing.models.families import (
    ATTN_IN,
    ATTN_OUT,
    FAMILIES,
    MLP_HIDDEN,
    MLP_IN,
    family_for_model_type,
    get_family,
)

# llama3 is a tiny Llama-3 (model_type llama: auto-detection gives the llama adapter, same layout).
ALL = ["llama", "mistral", "opt", "gpt2", "llama3", "qwen2", "gemma2"]


@pytest.fixture(scope="module", params=ALL)
def model_and_family(request):
    model = make_tiny_model(request.param, dtype=torch.float64)
    model.tiny_name = request.param  # which tiny model to rebuild (llama3's model_type is llama)
    return model, family_for_model_type(model.config.model_type)


def test_family_is_found_by_model_type(model_and_family):
    model, family = model_and_family
    assert family.name == model.config.model_type
    assert len(family.layers(model)) == model.config.num_hidden_layers


def test_weight_orientation_is_y_equals_x_w(model_and_family):
    """family.weight gives W (d_in, d_out) with module(x) == x W + b for every projection."""
    model, family = model_and_family
    x_by_input = {}
    for layer in family.layers(model):
        for kind in family.kinds:
            module = family.module(layer, kind)
            d_in, d_out = family.shape(layer, kind)
            x = x_by_input.setdefault(d_in, torch.randn(5, d_in, dtype=torch.float64))
            bias = family.bias(layer, kind)
            expected = x @ family.weight(layer, kind) + (0 if bias is None else bias)
            torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
            assert (d_in, d_out) == tuple(family.weight(layer, kind).shape)


def test_kinds_that_share_an_input_see_the_same_activation(model_and_family):
    """Hooks prove the declared input of each kind: same-input kinds receive equal tensors."""
    model, family = model_and_family
    layer = family.layers(model)[1]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        family.module(layer, kind).register_forward_hook(
            lambda _m, args, _out, kind=kind: seen.__setitem__(kind, args[0].detach().clone())
        )
        for kind in family.kinds
    ]
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 12)))
    for h in handles:
        h.remove()
    for kinds in family.kinds_by_input().values():
        for kind in kinds[1:]:
            assert torch.equal(seen[kind], seen[kinds[0]])
    inputs = [p.input for p in family.projections]
    assert set(inputs) == {ATTN_IN, ATTN_OUT, MLP_IN, MLP_HIDDEN}
    # Different inputs really differ (the hooks are not all on one tensor).
    firsts = [seen[k[0]] for k in family.kinds_by_input().values()]
    assert all(
        not torch.equal(a, b)
        for i, a in enumerate(firsts)
        for b in firsts[i + 1 :]
        if a.shape == b.shape
    )


def test_set_module_replaces_the_leaf_only(model_and_family):
    model, family = model_and_family
    model = make_tiny_model(model.tiny_name)
    layer = family.layers(model)[0]
    kind = family.private[0]
    marker = nn.Identity()
    family.set_module(layer, kind, marker)
    assert family.module(layer, kind) is marker
    assert family.module(family.layers(model)[1], kind) is not marker


def test_paper_default_sharing():
    """docs/methods.md §3.3: which kinds share a basis across a group, per family."""
    assert FAMILIES["llama"].shared == ("q", "k", "v", "up", "gate")
    assert FAMILIES["llama"].private == ("o", "down")
    assert FAMILIES["mistral"].shared == ("q", "up", "gate")
    assert FAMILIES["mistral"].private == ("k", "v", "o", "down")
    assert FAMILIES["opt"].shared == ("q", "k", "v", "up")
    assert FAMILIES["opt"].private == ("o", "down")
    assert FAMILIES["gpt2"].shared == ("attn", "up", "o")
    assert FAMILIES["gpt2"].private == ("down",)
    # The new families follow LLaMA's paper defaults; the GQA rule then keeps their narrow k/v
    # private (tests/test_new_families.py).
    for name in ("llama3", "qwen2", "gemma2"):
        assert FAMILIES[name].shared == ("q", "k", "v", "up", "gate")
        assert FAMILIES[name].private == ("o", "down")
    for name in ("llama", "llama3", "mistral", "qwen2", "gemma2"):
        assert FAMILIES[name].private_when_narrow == ("k", "v")
    assert FAMILIES["opt"].private_when_narrow == FAMILIES["gpt2"].private_when_narrow == ()
    for family in FAMILIES.values():
        assert sorted(family.shared + family.private) == sorted(family.kinds)


def test_layouts_and_gqa_shapes():
    mistral = make_tiny_model("mistral")
    fam = get_family("mistral")
    layer = fam.layers(mistral)[0]
    assert fam.shape(layer, "q") == (64, 64)
    assert fam.shape(layer, "k") == (64, 16)  # 2 kv heads x head_dim 8
    gpt2 = make_tiny_model("gpt2")
    fam = get_family("gpt2")
    layer = fam.layers(gpt2)[0]
    assert fam.projection("attn").layout == "conv1d"
    assert fam.shape(layer, "attn") == (64, 192)  # fused q, k, v
    assert fam.shape(layer, "down") == (256, 64)
    gemma2 = make_tiny_model("gemma2")
    fam = get_family("gemma2")
    layer = fam.layers(gemma2)[0]
    assert fam.shape(layer, "q") == (64, 48) and fam.shape(layer, "o") == (48, 64)  # head_dim 12
    assert fam.shape(layer, "k") == fam.shape(layer, "v") == (64, 24)  # 2 kv heads
    qwen2 = make_tiny_model("qwen2")
    fam = get_family("qwen2")
    layer = fam.layers(qwen2)[0]
    assert fam.bias(layer, "k").shape == (32,) and fam.bias(layer, "o") is None


def test_unknown_family_and_kind_list_choices():
    with pytest.raises(
        ConfigError, match="Valid choices: gemma2, gpt2, llama, llama3, mistral, opt, qwen2"
    ):
        get_family("bloom")
    # Each model_type once, though llama and llama3 both read "llama".
    with pytest.raises(
        ConfigError, match="Valid choices: gemma2, gpt2, llama, mistral, opt, qwen2"
    ):
        family_for_model_type("bloom")
    with pytest.raises(ConfigError, match="down, gate, k, o, q, up, v"):
        get_family("llama").projection("attn")
