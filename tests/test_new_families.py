"""Llama-3, Qwen2 and Gemma-2: their features, save -> load, a whole run, and the GQA rule.

The oracle tests every family shares (full rank reproduces the logits, planned parameters equal the
counted ones, module(x) == x W + b, hooks prove the shared inputs, Gram/scale/Fisher capture) are
parametrised over these families in test_families.py, test_basis_sharing.py and the calibration
tests; this file covers what is specific to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_config, make_tiny_model
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from basis_sharing import pipeline
from basis_sharing.calibration.grams import collect_grams
from basis_sharing.errors import HubUnreachableError
from basis_sharing.evaluation.params import (
    count_projection_weights,
    count_total,
    dense_projection_weights,
)
from basis_sharing.evaluation.perplexity import perplexity
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.plan import narrow_kinds, planned_params, resolve_kinds
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.compressed_io import load_compressed, save_compressed
from basis_sharing.models.families import family_for_model_type, get_family
from basis_sharing.modules import LowRankLinear, SharedBasisLinear
from basis_sharing.runtime.sequential import BlockRunner, token_batches
from basis_sharing.stages import prepare as prepare_stages

NEW = ["llama3", "qwen2", "gemma2"]
ADAPTER = {"llama3": "llama3", "qwen2": "qwen2", "gemma2": "gemma2"}
CPU = torch.device("cpu")
PROBE = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))


def method(name: str = "basis_sharing", **kw):
    schema = BasisSharingMethodConfig if name == "basis_sharing" else WhitenedSVDMethodConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **kw})
    return BasisSharing(cfg) if name == "basis_sharing" else SVDLLM(cfg)


def grams(model, family, seed: int = 0):
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(seed))
    return collect_grams(model, family, ids, batch_size=4, accumulate_dtype=torch.float64)


def ctx(stats, ratio: float = 0.3) -> CompressionContext:
    return CompressionContext(ratio=ratio, device=CPU, stats={"gram": stats})


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------ the tiny models are what they claim


def test_tiny_llama3_has_the_llama3_rope_scaling_and_gqa():
    model = make_tiny_model("llama3")
    rotary = model.model.rotary_emb
    assert model.config.model_type == "llama" and rotary.rope_type == "llama3"
    plain = make_tiny_model("llama3")
    plain.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    default = type(rotary)(plain.config)
    # The llama3 rule divides the low frequencies by the factor 8 and keeps the high ones.
    assert torch.equal(rotary.inv_freq[0], default.inv_freq[0])
    torch.testing.assert_close(rotary.inv_freq[-1], default.inv_freq[-1] / 8)
    family = get_family("llama3")
    layer = family.layers(model)[0]
    assert family.shape(layer, "q") == (64, 64) and family.shape(layer, "k") == (64, 16)
    assert family.shape(layer, "up") == (64, 224)  # d_ff = 3.5 d, as 14336 = 3.5 x 4096


def test_tiny_qwen2_has_biases_on_q_k_v_only():
    model = make_tiny_model("qwen2")
    family = get_family("qwen2")
    for layer in family.layers(model):
        for kind in family.kinds:
            bias = family.bias(layer, kind)
            if kind in ("q", "k", "v"):
                assert bias is not None and bias.abs().min() > 0  # random, not zeros
            else:
                assert bias is None


def test_tiny_gemma2_has_its_norms_tied_embeddings_and_soft_capping():
    model = make_tiny_model("gemma2")
    layer = get_family("gemma2").layers(model)[0]
    for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert hasattr(layer, norm)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    # The final soft-capping bounds every logit by final_logit_softcapping (1.0 here).
    out = logits(model)
    assert out.abs().max() < 1.0
    model.config.final_logit_softcapping = None
    uncapped = logits(model)
    torch.testing.assert_close(out, torch.tanh(uncapped), rtol=0, atol=1e-6)


def test_llama3_is_chosen_by_name_and_auto_detection_keeps_llama():
    model = make_tiny_model("llama3")
    assert family_for_model_type(model.config.model_type).name == "llama"
    assert get_family("llama3").model_types == ("llama",)
    assert get_family("llama3").projections == get_family("llama").projections
    assert family_for_model_type("qwen2").name == "qwen2"
    assert family_for_model_type("gemma2").name == "gemma2"


# ---------------------------------------------------------------------------- save -> load


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method_name", ["basis_sharing", "svd_llm"])
def test_save_load_gives_identical_logits(name, method_name, tmp_path, tiny_tokenizer):
    model = make_tiny_model(name, dtype=torch.float64)
    family = get_family(ADAPTER[name])
    kw = {"group_size": 2} if method_name == "basis_sharing" else {}
    method(method_name, **kw).compress(model, family, ctx(grams(model, family)))
    path = save_compressed(model, tmp_path / "out", family=family, tokenizer=tiny_tokenizer)
    loaded = load_compressed(path)
    assert loaded.family is family
    assert torch.equal(logits(loaded.model), logits(model))
    assert count_total(loaded.model) == count_total(model)
    assert count_projection_weights(loaded.model, family) == count_projection_weights(model, family)
    for old, new in zip(family.layers(model), family.layers(loaded.model), strict=True):
        for kind in family.kinds:
            a, b = family.module(old, kind), family.module(new, kind)
            assert type(a) is type(b) and a.rank == b.rank
            if kind in ("q", "k", "v") and name == "qwen2":
                assert torch.equal(a.coefficient.bias, b.coefficient.bias)
    out, inp = loaded.model.get_output_embeddings(), loaded.model.get_input_embeddings()
    assert (out.weight is inp.weight) == (name == "gemma2")  # Gemma-2's tie is restored


@pytest.mark.parametrize("name", ["gemma2", "llama"])
def test_layer_by_layer_runner_reproduces_every_layers_input(name):
    """The sequential update's runner gives each layer the input a full forward gives it.

    Gemma-2's layers alternate sliding-window (8 tokens here) and full attention, so with 32-token
    blocks layer 1 needs its own mask, not layer 0's.
    """
    model = make_tiny_model(name, dtype=torch.float64)
    layers = get_family(name).layers(model)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kw, i=i: seen.setdefault(i, []).append(
                (args[0] if args else kw["hidden_states"]).clone()
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for start in (0, 2):
            model(input_ids=ids[start : start + 2], use_cache=False)
    for handle in handles:
        handle.remove()
    runner = BlockRunner(model, get_family(name), torch.device("cpu"))
    with runner.open(token_batches(ids, 2), desc="check") as session:
        for block in session.blocks():
            (i,) = block.layers
            for (hidden, _), expected in zip(block.inputs(), seen[i], strict=True):
                torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-12)
            block.run(keep_outputs=True)
    assert sorted(seen) == list(range(len(layers)))


# ------------------------------------------------------------------------------- the GQA rule


def tiny_llama(kv_heads: int, head_dim: int = 16):
    """A tiny LLaMA (hidden 64, 4 query heads) whose k/v are kv_heads * head_dim wide."""
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


def test_gqa_rule_keeps_narrow_k_v_private_by_default():
    model = tiny_llama(kv_heads=2)  # k/v 64 -> 32: exactly half, narrow
    family = get_family("llama")
    assert narrow_kinds(family, model) == ("k", "v")
    bs = method(group_size=2)
    assert bs.kinds(family, model) == (("q", "up", "gate"), ("k", "v", "o", "down"))
    info = bs.compress(model, family, ctx(grams(model, family)))
    assert info["shared_kinds"] == ["q", "up", "gate"]
    assert info["private_kinds"] == ["k", "v", "o", "down"]
    assert info["private_by_gqa_rule"] == ["k", "v"]
    layers = family.layers(model)
    assert isinstance(family.module(layers[0], "k"), LowRankLinear)
    assert isinstance(family.module(layers[0], "q"), SharedBasisLinear)
    assert sorted(model.shared_bases) == ["gate_g0", "gate_g1", "q_g0", "q_g1", "up_g0", "up_g1"]


@pytest.mark.parametrize("kv_heads,head_dim", [(4, 16), (2, 24)], ids=["mha", "gqa-wide"])
def test_gqa_rule_leaves_k_v_shared_when_not_narrow(kv_heads, head_dim):
    model = tiny_llama(kv_heads=kv_heads, head_dim=head_dim)  # k/v 64 -> 64, or 64 -> 48 > 32
    assert get_family("llama").shape(get_family("llama").layers(model)[0], "k")[1] in (64, 48)
    family = get_family("llama")
    assert narrow_kinds(family, model) == ()
    info = method(group_size=2).compress(model, family, ctx(grams(model, family)))
    assert info["shared_kinds"] == ["q", "k", "v", "up", "gate"]
    assert info["private_kinds"] == ["o", "down"] and info["private_by_gqa_rule"] == []
    assert isinstance(family.module(family.layers(model)[0], "k"), SharedBasisLinear)


@pytest.mark.parametrize(
    "explicit,shared",
    [
        ({"shared": ["q", "k", "v", "up", "gate"]}, ["q", "k", "v", "up", "gate"]),
        ({"private": ["o", "down"]}, ["q", "k", "v", "up", "gate"]),
        ({"shared": ["k"]}, ["k"]),
    ],
    ids=["shared-list", "private-list", "only-k"],
)
def test_explicit_kinds_win_over_the_gqa_rule(explicit, shared):
    model = tiny_llama(kv_heads=2)
    family = get_family("llama")
    bs = method(group_size=2, **explicit)
    info = bs.compress(model, family, ctx(grams(model, family)))
    assert info["shared_kinds"] == shared and info["private_by_gqa_rule"] == []
    assert isinstance(family.module(family.layers(model)[0], "k"), SharedBasisLinear)


def test_gqa_rule_moves_nothing_already_private_and_svd_llm_records_none():
    model = make_tiny_model("mistral", dtype=torch.float64)
    family = get_family("mistral")
    assert narrow_kinds(family, model) == ("k", "v")  # narrow, and already private in the paper
    info = method().compress(model, family, ctx(grams(model, family)))
    assert info["private_kinds"] == ["k", "v", "o", "down"] and info["private_by_gqa_rule"] == []
    llama = tiny_llama(kv_heads=2)
    info = method("svd_llm").compress(llama, get_family("llama"), ctx(grams(llama, family)))
    assert info["shared_kinds"] == [] and info["private_by_gqa_rule"] == []


def test_resolve_kinds_applies_narrow_to_the_defaults_only():
    fam = get_family("llama")
    assert resolve_kinds(fam, None, None, ("k", "v")) == (
        ("q", "up", "gate"),
        ("k", "v", "o", "down"),
    )
    assert resolve_kinds(fam, ["q", "k"], None, ("k", "v")) == (
        ("q", "k"),
        ("v", "o", "up", "gate", "down"),
    )
    assert resolve_kinds(fam, None, None) == (("q", "k", "v", "up", "gate"), ("o", "down"))


# ---------------------------------------------- real shapes on the meta device (no weights)

# The published config.json values that decide the shapes (hidden, layers, heads, KV heads,
# head_dim, d_ff, vocabulary); everything else is transformers' default.
REAL = {
    "llama3_8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)),
    "llama3.1_8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=14336,
                                 vocab_size=128256, max_position_embeddings=131072,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192})),
    "qwen2.5_7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, intermediate_size=18944,
                                vocab_size=152064)),
    "gemma2_2b": ("gemma2", dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=256, intermediate_size=9216,
                                vocab_size=256000)),
    "llama7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "smollm2_135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3, intermediate_size=1536,
                                  vocab_size=49152)),
}  # fmt: skip


def meta_model(hf_config) -> torch.nn.Module:
    """The model of ``hf_config`` with every tensor on the meta device: shapes, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(hf_config)


@pytest.fixture(scope="module")
def real_meta_models():
    return {
        name: meta_model(AutoConfig.for_model(model_type, **kw))
        for name, (model_type, kw) in REAL.items()
    }


@pytest.mark.parametrize("name", list(REAL))
def test_real_shapes_get_the_gqa_rule_and_meet_every_paper_ratio(name, real_meta_models):
    """On the real shapes: k/v private exactly for the GQA models; the plan meets 0.2 .. 0.5."""
    model = real_meta_models[name]
    family = get_family(compose_config(f"model={name}").model.family or "llama")
    assert family.layers(model)[0].self_attn.k_proj.weight.is_meta
    gqa = name != "llama7b"
    assert narrow_kinds(family, model) == (("k", "v") if gqa else ())
    bs = method(group_size=2)
    shared, private = bs.kinds(family, model)
    assert ("k" in private) == gqa and ("k" in shared) == (not gqa)
    dense = dense_projection_weights(model, family)
    for ratio in (0.2, 0.3, 0.4, 0.5):
        plans = bs.plan(model, family, CompressionContext(ratio=ratio, device=CPU))
        achieved = 1.0 - planned_params(plans, dense)["kept"] / dense
        assert abs(achieved - ratio) <= 0.005, (name, ratio, achieved)


def test_new_configs_name_their_adapters():
    expected = {
        "llama3_8b": ("llama3", "meta-llama/Meta-Llama-3-8B"),
        "llama3.1_8b": ("llama3", "meta-llama/Llama-3.1-8B"),
        "qwen2.5_7b": ("qwen2", "Qwen/Qwen2.5-7B"),
        "gemma2_2b": ("gemma2", "google/gemma-2-2b"),
    }
    for name, (family, hf_id) in expected.items():
        model = compose_config(f"model={name}").model
        assert (model.family, model.hf_id, model.dtype) == (family, hf_id, "float32")
        assert (model.context_length, model.calib_batch_size, model.eval_batch_size) == (2048, 4, 1)


# ------------------------------------------------------------------------ through the pipeline


@pytest.mark.parametrize("name", ["llama3_8b", "llama3.1_8b", "qwen2.5_7b", "gemma2_2b"])
def test_hub_model_offline_fails_fast_and_loads_no_model(name, tiny_mirror, tmp_path, monkeypatch):
    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prepare_stages, "load_model", no_model)
    cfg = compose_config(
        f"model={name}",
        "method=dense",
        "offline=true",
        "eval=ppl",  # the tiny mirror has no zero-shot rows (a missing-data error would come first)
        f"paths.data_dir={tiny_mirror}",
        f"paths.cache_dir={tmp_path}/cache",
    )
    with pytest.raises(HubUnreachableError) as err:
        pipeline.run(cfg, out_dir=tmp_path / "run")
    message = str(err.value)
    assert "is not in the local Hugging Face cache and the hub is unreachable" in message
    assert f"python run.py model={name} model.local_path=/path/to/" in message
    results = tmp_path / "run" / "results.json"
    assert not results.exists() or "load_model" not in json.loads(results.read_text())["stages"]


def test_run_py_llama3_1_offline_fails_with_the_hub_message(tiny_mirror, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "model=llama3.1_8b",
            "offline=true",
            "method=dense",
            "eval=ppl",
            f"paths.data_dir={tiny_mirror}",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home")},
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "Model 'llama3.1_8b' (meta-llama/Llama-3.1-8B, revision main)" in output
    assert "model=llama3.1_8b model.local_path=/path/to/Llama-3.1-8B" in output


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_gemma2")
    make_tiny_model("gemma2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_gemma2_run_compresses_saves_and_reloads(tiny_gemma2_dir, tiny_mirror, tmp_path):
    """A whole Basis Sharing run on a local Gemma-2, saved, then evaluated from the save."""
    common = (
        "model=local",
        f"model.local_path={tiny_gemma2_dir}",
        "model.context_length=64",
        f"paths.data_dir={tiny_mirror}",
        f"paths.cache_dir={tmp_path}/cache",
        "eval=ppl",
        "eval.max_windows=2",
        "eval.ppl_datasets=[wikitext2]",
    )
    cfg = compose_config(
        *common,
        "method=basis_sharing",
        "ratio=0.3",
        "ratio_tolerance=0.05",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "save_model=true",
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert record["status"] == "completed" and record["model"]["family"] == "gemma2"
    info = record["method_info"]
    assert info["shared_kinds"] == ["q", "up", "gate"] and info["private_by_gqa_rule"] == ["k", "v"]
    params = record["params"]
    assert params["decoder_projections"] == info["planned_params"]["kept"]
    assert abs(params["achieved_ratio"] - 0.3) <= 0.05
    ppl = record["metrics"]["perplexity"]["wikitext2"]["ppl"]
    assert 1.0 < ppl < 1e4

    saved = record["saved_model"]
    reload = compose_config(*common, "method=none", f"load_model={saved}")
    again = pipeline.run(reload, out_dir=tmp_path / "reload")
    assert again["metrics"]["perplexity"]["wikitext2"]["ppl"] == ppl
    assert again["params"]["decoder_projections"] == params["decoder_projections"]


def test_gemma2_perplexity_is_the_exp_of_the_capped_models_mean_nll():
    model = make_tiny_model("gemma2", dtype=torch.float64)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, ids, context_length=20)
    nlls = []
    for start in (0, 20):
        window = ids[start : start + 20][None]
        out = logits(model, window)[0, :-1]
        nlls.append(torch.nn.functional.cross_entropy(out, window[0, 1:]))
    expected = torch.exp(torch.stack(nlls).mean()).item()
    assert result.n_windows == 2
    assert result.ppl == pytest.approx(expected, rel=1e-9)
