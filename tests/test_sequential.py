"""runtime=sequential: block by block gives the numbers of the whole model, on every family.

Each oracle is the whole-model computation (runtime=full) on an identical copy of the model:
the block inputs equal what each layer receives in a plain forward, the Grams and scales equal the
whole-model ones, Basis Sharing and SVD-LLM's update give the same perplexity, and block-by-block
perplexity equals the whole model's. The placement tests move tensors to the meta device, the one
other device a CPU-only machine has, and check what moved and what stayed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model
from omegaconf import OmegaConf
from torch import nn

from basis_sharing.calibration import collect_forward, collect_statistics, get_statistic
from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.perplexity import perplexity
from basis_sharing.methods import METHODS
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.families import get_family
from basis_sharing.modules import install_factors
from basis_sharing.runtime import (
    BlockRunner,
    check_runtime,
    hidden_device,
    layer_units,
    make_runner,
    weight_device,
)
from basis_sharing.runtime.placement import OuterPart, borrowed_parameters, move_block
from basis_sharing.runtime.sequential import check_units, token_batches

FAMILIES = ["llama", "mistral", "opt", "gpt2", "llama3", "qwen2", "gemma2"]
F64, CPU = torch.float64, torch.device("cpu")
IDENT = {"model": "tiny"}
CALIB = "c" * 64
SEQUENTIAL_DEFAULTS = {"hidden_states": "cpu", "distributed_backend": "auto"}


def _ids(n: int, length: int, seed: int, vocab: int = TINY_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        for m in model.modules()
    )


# ---------------------------------------------------------------- block inputs


@pytest.mark.parametrize("name", FAMILIES)
def test_block_inputs_are_what_each_layer_receives_in_a_plain_forward(name):
    """Oracle: pre-hooks record every layer's hidden states and call in one ordinary forward.

    Gemma-2 alternates sliding-window (8 tokens) and full attention, so with 24-token blocks each
    layer needs its own mask; GPT-2 passes its mask positionally.
    """
    model, family = make_tiny_model(name, dtype=F64), get_family(name)
    ids = _ids(5, 24, seed=1)
    seen: dict[int, list[tuple[torch.Tensor, tuple, dict]]] = {}

    def record(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            seen.setdefault(i, []).append((hidden.clone(), tuple(args[1:]), rest))

        return hook

    layers = family.layers(model)
    handles = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in token_batches(ids, 2):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()

    runner = BlockRunner(model, family, CPU)
    with runner.open(token_batches(ids, 2)) as session:
        assert len(session.states) == 3  # batches of 2, 2, 1
        for block in session.blocks():
            (i,) = block.layers
            assert block.modules[0] is layers[i]
            for state, (hidden, args, kwargs) in zip(block.states, seen[i], strict=True):
                torch.testing.assert_close(state.hidden, hidden, rtol=0, atol=1e-12)
                call = state.calls[i]
                assert len(call.args) == len(args) and call.kwargs.keys() == kwargs.keys()
                _assert_same_value([*call.args, *call.kwargs.values()], [*args, *kwargs.values()])
    assert _no_hooks_left(model) and "forward" not in layers[0].__dict__


def _assert_same_value(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same_value(g, w)
    else:
        assert got == want or got is want


def test_a_layer_that_needs_its_own_mask_gets_it():
    """Gemma-2's layers 0 and 1 get different masks (sliding window vs full attention)."""
    model, family = make_tiny_model("gemma2", dtype=F64), get_family("gemma2")
    with BlockRunner(model, family, CPU).open([_ids(1, 24, seed=2)]) as session:
        masks = [call.kwargs["attention_mask"] for call in session.states[0].calls]
    assert masks[0] is not None and masks[1] is not None
    assert not torch.equal(masks[0], masks[1])
    assert masks[0] is masks[2]  # a tensor shared by several layers' calls is stored once


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", FAMILIES)
def test_sequential_grams_and_scales_equal_the_whole_model_ones(name):
    model, family = make_tiny_model(name, dtype=F64), get_family(name)
    ids = _ids(6, 16, seed=0)
    wanted = [get_statistic("gram"), get_statistic("scale")]
    full = collect_forward(wanted, model, family, ids, 4, "float64")
    seq = collect_forward(wanted, model, family, ids, 4, "float64", BlockRunner(model, family, CPU))
    assert set(seq["gram"].grams) == set(full["gram"].grams)
    assert (
        (seq["gram"].tokens, seq["gram"].dtype)
        == (full["gram"].tokens, "float64")
        == (96, "float64")
    )
    for key, gram in full["gram"].grams.items():
        assert seq["gram"].grams[key].dtype == F64
        assert _rel(seq["gram"].grams[key], gram) <= 1e-6, key
    assert (seq["scale"].tokens, seq["scale"].batches) == (96, 2)
    for key, mean in full["scale"].abs_mean.items():
        assert _rel(seq["scale"].abs_mean[key], mean) <= 1e-6
        assert _rel(seq["scale"].abs_max[key], full["scale"].abs_max[key]) <= 1e-6
    assert _no_hooks_left(model)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_units_of_several_layers_give_the_same_grams(name):
    """A layer group on the device together: later members see the earlier members' outputs."""
    model, family = make_tiny_model(name, dtype=F64), get_family(name)
    ids = _ids(4, 16, seed=3)
    gram = get_statistic("gram")
    full = collect_forward([gram], model, family, ids, 2, "float64")["gram"]
    runner = BlockRunner(model, family, CPU)
    taken: dict[tuple[int, str], torch.Tensor] = {}
    from basis_sharing.calibration.grams import GramAccumulator

    with runner.open(token_batches(ids, 2)) as session:
        for block in session.blocks(layer_units(4, size=3)):  # (0, 1, 2), (3,)
            accs, handles = {}, []
            for i, layer in zip(block.layers, block.modules, strict=True):
                for stream, kinds in family.kinds_by_input().items():
                    acc = accs[(i, stream)] = GramAccumulator(F64)
                    module = family.module(layer, kinds[0])
                    handles.append(
                        module.register_forward_hook(lambda _m, a, _o, acc=acc: acc.add(a[0]))
                    )
            block.run(keep_outputs=True)
            for handle in handles:
                handle.remove()
            taken.update({key: acc.gram for key, acc in accs.items()})
    assert taken.keys() == full.grams.keys()
    for key, gram in full.grams.items():
        assert _rel(taken[key], gram) <= 1e-6


def test_units_must_cover_every_layer_in_order():
    assert check_units([(0, 1), (2,), (3,)], 4) == [(0, 1), (2,), (3,)]
    for bad in ([(0, 1), (3,)], [(1,), (0,), (2,), (3,)], [(0, 1, 2, 3), ()]):
        with pytest.raises(ValueError, match="consecutive runs in order"):
            check_units(bad, 4)
    assert layer_units(5, 2) == [(0, 1), (2, 3), (4,)]


def test_a_backward_statistic_is_refused_block_by_block(tmp_path):
    model, family = make_tiny_model("llama"), get_family("llama")
    with pytest.raises(ConfigError, match="'fisher' needs a backward pass.*runtime=full"):
        collect_statistics(
            ["gram", "fisher"], model, family, _ids(2, 8, 0), 2, "float32", IDENT, CALIB,
            tmp_path, runner=BlockRunner(model, family, CPU),
        )  # fmt: skip
    assert not (tmp_path / "stats").exists()


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("name", FAMILIES)
def test_block_by_block_perplexity_equals_the_whole_model(name):
    model, family = make_tiny_model(name, dtype=F64), get_family(name)
    ids = _ids(1, 150, seed=4)[0]  # windows of 32: four full, one of 22 tokens
    full = perplexity(model, ids, 32, batch_size=2)
    seq = perplexity(model, ids, 32, batch_size=2, runner=BlockRunner(model, family, CPU))
    assert (seq.n_windows_evaluated, seq.n_targets) == (full.n_windows_evaluated, 145) == (5, 145)
    assert seq.mean_nll == pytest.approx(full.mean_nll, rel=1e-6)
    assert seq.ppl == pytest.approx(full.ppl, rel=1e-6)


def test_block_by_block_perplexity_of_a_model_with_a_shared_basis():
    """Members of a group borrow the basis registered at the model root: it moves with them."""
    model, family = make_tiny_model("llama", dtype=F64), get_family("llama")
    _share_q_basis(model, family)
    ids = _ids(1, 96, seed=5)[0]
    full = perplexity(model, ids, 32)
    seq = perplexity(model, ids, 32, runner=BlockRunner(model, family, CPU))
    assert seq.ppl == pytest.approx(full.ppl, rel=1e-6)


def _share_q_basis(model, family) -> None:
    """Layers 0 and 1 share one rank-8 q basis (a Basis Sharing group, built by hand)."""
    layers = family.layers(model)
    g = torch.Generator().manual_seed(6)
    basis = torch.randn(64, 8, generator=g, dtype=F64)
    coefficients = [torch.randn(8, 64, generator=g, dtype=F64) for _ in range(2)]
    leaves = [(layers[i], family.projection("q").path) for i in (0, 1)]
    install_factors(model, leaves, basis, coefficients, shared_key="q_g0")


# ---------------------------------------------------------------- compression


def _compress_and_score(name, method_name, sequential, cache_dir, **settings):
    """(perplexity, update info) of a fresh tiny model compressed at ratio 0.2."""
    model, family = make_tiny_model(name, dtype=F64), get_family(name)
    return _run_method(model, family, method_name, sequential, cache_dir, **settings)


def _run_method(model, family, method_name, sequential, cache_dir, ids=None, eval_ids=None,
                context=32, **settings):  # fmt: skip
    cls = METHODS[method_name]
    method = cls(
        OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": method_name, **settings})
    )
    runner = BlockRunner(model, family, CPU) if sequential else None
    ids = _ids(8, 16, seed=7) if ids is None else ids
    collected = collect_statistics(
        method.stats_needed, model, family, ids, 4, "float64", IDENT, CALIB, cache_dir,
        runner=runner,
    )  # fmt: skip
    assert not any(c.cache_hit for c in collected.values())  # each run computes its own
    ctx = CompressionContext(
        ratio=0.2,
        device=CPU,
        calibration_ids=ids,
        calib_batch_size=4,
        stats={n: c.value for n, c in collected.items()},
        gram_dtype=F64,
        runner=runner,
    )
    info = method.compress(model, family, ctx)
    eval_ids = _ids(1, 130, seed=8)[0] if eval_ids is None else eval_ids
    return perplexity(model, eval_ids, context, batch_size=2, runner=runner).ppl, info


BS_CASES = [(name, False) for name in FAMILIES] + [(n, True) for n in ("llama", "gpt2", "gemma2")]


@pytest.mark.parametrize("name,update", BS_CASES)
def test_basis_sharing_at_20_percent_gives_the_same_perplexity(name, update, tmp_path):
    full, info_full = _compress_and_score(
        name, "basis_sharing", False, tmp_path / "f", update=update
    )
    seq, info_seq = _compress_and_score(name, "basis_sharing", True, tmp_path / "s", update=update)
    assert seq == pytest.approx(full, rel=1e-4)
    assert info_seq["groups"] == info_full["groups"]  # the same plan, ranks included
    if update:  # the single-pass update ran block by block on the compressed model
        for key in ("error_before", "error_after"):
            assert info_seq["update"][key] == pytest.approx(info_full["update"][key], rel=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_svd_llm_sequential_update_gives_the_same_perplexity(name, tmp_path):
    full, info_full = _compress_and_score(name, "svd_llm", False, tmp_path / "f", update=True)
    seq, info_seq = _compress_and_score(name, "svd_llm", True, tmp_path / "s", update=True)
    assert seq == pytest.approx(full, rel=1e-4)
    assert info_seq["update"]["mode"] == "layerwise"
    for g_seq, g_full in zip(
        info_seq["update"]["groups"], info_full["update"]["groups"], strict=True
    ):
        assert (g_seq["kind"], g_seq["layers"]) == (g_full["kind"], g_full["layers"])
        assert g_seq["error_after"] == pytest.approx(g_full["error_after"], rel=1e-6)


@pytest.mark.slow
def test_the_embedded_model_block_by_block(embedded_cache, tmp_path):
    """SmolLM2-135M (GQA, tied embeddings) on a few short calibration blocks.

    Grams and perplexity on all 30 blocks; the compressions on its first 2 blocks (its real
    weights; one Basis Sharing group of 2), which keeps the float64 SVDs short.
    """
    from transformers import AutoModelForCausalLM

    _, _, model_dir, _ = embedded_cache
    family = get_family("llama")
    ids = _ids(4, 32, seed=9, vocab=49152)
    eval_ids = _ids(1, 130, seed=10, vocab=49152)[0]

    def fresh(blocks: int | None = None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if blocks is not None:
            model.model.layers = model.model.layers[:blocks]
            model.config.num_hidden_layers = blocks
        return model

    model = fresh()
    gram = get_statistic("gram")
    whole = collect_forward([gram], model, family, ids, 2, "float64")["gram"]
    runner = BlockRunner(model, family, CPU)
    blocks = collect_forward([gram], model, family, ids, 2, "float64", runner)["gram"]
    assert len(whole.grams) == 30 * 4 and blocks.grams.keys() == whole.grams.keys()
    assert max(_rel(blocks.grams[k], g) for k, g in whole.grams.items()) <= 1e-6
    ppl_full = perplexity(model, eval_ids, 64, batch_size=2)
    ppl_seq = perplexity(model, eval_ids, 64, batch_size=2, runner=runner)
    assert ppl_seq.ppl == pytest.approx(ppl_full.ppl, rel=1e-6)

    for method_name, settings in (("basis_sharing", {}), ("svd_llm", {"update": True})):
        scores = [
            _run_method(fresh(2), family, method_name, seq, tmp_path / f"{method_name}{seq}",
                        ids=ids, eval_ids=eval_ids, context=64, **settings)[0]
            for seq in (False, True)
        ]  # fmt: skip
        assert scores[1] == pytest.approx(scores[0], rel=1e-4), method_name


# ---------------------------------------------------------------- a whole run


@pytest.mark.parametrize(
    "method", [("method=basis_sharing",), ("method=svd_llm", "method.update=true", "ratio=0.4")]
)
def test_a_run_with_runtime_sequential_records_what_runtime_full_does(
    method, tiny_model_dir, tiny_mirror, tmp_path
):
    from conftest import compose_config, tiny_run_overrides

    from basis_sharing import pipeline

    records = {}
    for runtime in ("full", "sequential"):
        cfg = compose_config(
            *tiny_run_overrides(tiny_model_dir, tiny_mirror, *method),
            f"runtime={runtime}",
            "calibration=wikitext2_cpu",
            "calibration.n_samples=4",
            "calibration.seq_len=32",
            "calibration.gram_dtype=float64",
            "model.calib_batch_size=2",
            "eval.max_windows=2",
            "eval.ppl_datasets=[wikitext2,ptb]",
            "ratio_tolerance=0.05",  # rank rounding on 64-wide matrices
            f"paths.cache_dir={tmp_path}/{runtime}/cache",  # each run computes its own Grams
        )
        records[runtime] = pipeline.run(cfg, out_dir=tmp_path / runtime)
    full, seq = records["full"], records["sequential"]
    assert seq["status"] == full["status"] == "completed"
    assert seq["config"]["runtime"] == {**SEQUENTIAL_DEFAULTS, "name": "sequential"}
    assert seq["calibration"]["stats_key"] == full["calibration"]["stats_key"]
    assert not seq["calibration"]["cache_hit"] and not full["calibration"]["cache_hit"]
    assert seq["method_info"]["groups"] == full["method_info"]["groups"]
    assert seq["params"] == full["params"]
    for name in ("wikitext2", "ptb"):
        got, want = seq["metrics"]["perplexity"][name], full["metrics"]["perplexity"][name]
        assert got["n_windows_evaluated"] == want["n_windows_evaluated"] == 2
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)


def test_a_saved_model_with_shared_bases_is_evaluated_block_by_block(
    tiny_model_dir, tiny_mirror, tmp_path
):
    from conftest import compose_config, tiny_run_overrides

    from basis_sharing import pipeline

    common = [
        "eval.max_windows=2",
        "eval.ppl_datasets=[wikitext2]",
        "ratio_tolerance=0.05",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    saved = pipeline.run(
        compose_config(
            *tiny_run_overrides(tiny_model_dir, tiny_mirror, "method=basis_sharing"),
            "calibration=wikitext2_cpu",
            "calibration.n_samples=4",
            "calibration.seq_len=32",
            "save_model=true",
            *common,
        ),
        out_dir=tmp_path / "compress",
    )
    assert any(len(g["layers"]) > 1 for g in saved["method_info"]["groups"])  # shared bases
    loaded = pipeline.run(
        compose_config(
            *tiny_run_overrides(tiny_model_dir, tiny_mirror, "method=none"),
            f"load_model={saved['saved_model']}",
            "runtime=sequential",
            *common,
        ),
        out_dir=tmp_path / "evaluate",
    )
    got, want = (r["metrics"]["perplexity"]["wikitext2"]["ppl"] for r in (loaded, saved))
    assert got == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- placement


def test_the_outer_part_is_everything_outside_the_blocks():
    model, family = make_tiny_model("gpt2"), get_family("gpt2")  # lm_head tied to wte
    _share_attn_basis(model, family)
    outer = OuterPart(model, list(family.layers(model)))
    t = model.transformer
    expected = [t.wte.weight, t.wpe.weight, t.ln_f.weight, t.ln_f.bias]
    assert {id(p) for p in outer._params.values()} == {id(p) for p in expected}
    assert model.lm_head.weight is t.wte.weight  # a tie is one parameter, moved once
    # the basis the blocks borrow is not outer: it travels with its blocks
    assert id(model.shared_bases["attn_g0"].weight) not in outer._params
    llama = make_tiny_model("llama")
    outer = OuterPart(llama, list(get_family("llama").layers(llama)))
    assert {name for _, name in outer._buffers} == {"inv_freq", "original_inv_freq"}  # rotary
    assert {id(p) for p in outer._params.values()} == {
        id(llama.model.embed_tokens.weight),
        id(llama.model.norm.weight),
        id(llama.lm_head.weight),
    }


def _share_attn_basis(model, family) -> None:
    """GPT-2 layers 0 and 1 share one rank-8 c_attn basis."""
    layers = family.layers(model)
    leaves = [(layers[i], family.projection("attn").path) for i in (0, 1)]
    coefficients = [torch.randn(8, 192) for _ in range(2)]
    install_factors(model, leaves, torch.randn(64, 8), coefficients, "attn_g0")


def test_a_block_borrows_exactly_the_basis_it_shares():
    model, family = make_tiny_model("gpt2"), get_family("gpt2")
    _share_attn_basis(model, family)
    layers = family.layers(model)
    basis = model.shared_bases["attn_g0"].weight
    assert borrowed_parameters(layers[0]) == [basis] == borrowed_parameters(layers[1])
    assert borrowed_parameters(layers[2]) == []
    move_block(layers[0], CPU)  # the data moves in place: every reference keeps the parameter
    assert model.shared_bases["attn_g0"].weight is basis


def test_compressed_factors_are_installed_where_the_dense_weights_are():
    """A model kept on the CPU stays there when its factors were computed on another device."""
    model, family = make_tiny_model("llama"), get_family("llama")
    layer = family.layers(model)[0]
    (installed,) = install_factors(
        model,
        [(layer, "mlp.up_proj")],
        torch.randn(64, 4, dtype=F64),
        [torch.randn(4, 128, dtype=F64)],
    )
    assert all(p.device == CPU and p.dtype == torch.float32 for p in installed.parameters())


# ---------------------------------------------------------------- the runtime group


def _runtime(name, **settings):
    return OmegaConf.create({"name": name, **settings})


@pytest.mark.parametrize("method_name", ["fwsvd", "asvd"])
def test_methods_that_need_the_whole_model_are_refused(method_name):
    cls = METHODS[method_name]
    method = cls(OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": method_name}))
    with pytest.raises(ConfigError) as err:
        check_runtime(_runtime("sequential", hidden_states="cpu"), method, ["svd_llm", "svd"])
    message = str(err.value)
    assert f"method={method_name} cannot run with runtime=sequential" in message
    assert "backward pass through every layer" in message  # why
    assert f"Use runtime=full for method={method_name}" in message  # what instead
    assert message.endswith("(svd, svd_llm).")
    check_runtime(_runtime("full"), method)  # the whole model: fine


def test_methods_that_run_block_by_block_pass_and_bad_settings_are_named():
    for name in ("basis_sharing", "svd_llm", "svd", "dense"):
        cls = METHODS[name]
        assert cls.supports_sequential
        method = cls(OmegaConf.merge(OmegaConf.structured(cls.schema), {"name": name}))
        check_runtime(_runtime("sequential", hidden_states="device"), method)
    method = METHODS["svd"](OmegaConf.create({"name": "svd"}))
    with pytest.raises(
        ConfigError, match="Unknown runtime 'sequentail'.*Did you mean 'sequential'"
    ):
        check_runtime(_runtime("sequentail"), method)
    with pytest.raises(
        ConfigError, match="runtime.hidden_states 'gpu'. Valid choices: cpu, device"
    ):
        check_runtime(_runtime("sequential", hidden_states="gpu"), method)


def test_placement_and_runner_follow_the_runtime():
    cuda = torch.device("cuda")
    assert weight_device(_runtime("full"), cuda) == cuda
    assert weight_device(_runtime("sequential", hidden_states="cpu"), cuda) == CPU
    assert hidden_device(_runtime("sequential", hidden_states="cpu"), cuda) == CPU
    assert hidden_device(_runtime("sequential", hidden_states="device"), cuda) == cuda
    model, family = make_tiny_model("llama"), get_family("llama")
    assert make_runner(_runtime("full"), model, family, CPU) is None
    runner = make_runner(_runtime("sequential", hidden_states="device"), model, family, "cpu")
    assert isinstance(runner, BlockRunner) and runner.device == CPU and runner.hidden_device == CPU


def test_the_runtime_group_composes_with_its_defaults():
    from conftest import compose_config

    from basis_sharing.config import check_config

    full = {"name": "full", "distributed_backend": "auto"}
    assert OmegaConf.to_container(compose_config().runtime) == full
    cfg = compose_config("runtime=sequential")
    assert OmegaConf.to_container(cfg.runtime) == {**SEQUENTIAL_DEFAULTS, "name": "sequential"}
    check_config(cfg)
    with pytest.raises(ConfigError, match="runtime.hidden_states 'gpu'"):
        check_config(compose_config("runtime=sequential", "runtime.hidden_states=gpu"))
    method = METHODS["svd"](OmegaConf.create({"name": "svd"}))
    bad = compose_config("runtime.distributed_backend=mpi").runtime
    with pytest.raises(ConfigError, match="distributed_backend 'mpi'. Valid choices: auto, gloo"):
        check_runtime(bad, method)


# ---------------------------------------------------------------- on a real second device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_only_one_block_is_on_the_device_and_the_numbers_match():
    cuda = torch.device("cuda")
    name = "gemma2"
    family = get_family(name)
    kept = make_tiny_model(name, dtype=F64)  # stays on the CPU
    whole = make_tiny_model(name, dtype=F64).to(cuda)
    ids = _ids(6, 24, seed=11)
    gram = get_statistic("gram")
    full = collect_forward([gram], whole, family, ids, 2, "float64")["gram"]
    runner = BlockRunner(kept, family, cuda)
    seen = []
    with runner.open(token_batches(ids, 2)) as session:
        for block in session.blocks():
            on_device = [
                all(p.device.type == "cuda" for p in layer.parameters())
                for layer in family.layers(kept)
            ]
            seen.append(on_device)
            block.run(keep_outputs=True)
        assert kept.model.embed_tokens.weight.device.type == "cuda"  # the outer part, for now
    assert seen == [[i == j for j in range(4)] for i in range(4)]
    assert all(p.device == CPU for p in kept.parameters())
    seq = collect_forward([gram], kept, family, ids, 2, "float64", runner)["gram"]
    for key, g in full.grams.items():
        assert _rel(seq.grams[key], g) <= 1e-6
    eval_ids = _ids(1, 100, seed=12)[0]
    assert perplexity(kept, eval_ids, 32, runner=runner).ppl == pytest.approx(
        perplexity(whole, eval_ids, 32).ppl, rel=1e-6
    )
