"""FiPS: shared MLP basis U, sparse per-matrix V, local reconstruction with GMP (issue 12)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import compose_config, make_tiny_model, tiny_run_overrides
from omegaconf import OmegaConf

import basis_sharing.methods  # noqa: F401  (registers every method)
from basis_sharing.calibration.statistics import collect_forward, get_statistic
from basis_sharing.errors import ConfigError
from basis_sharing.evaluation.params import count_projection_weights, dense_projection_weights
from basis_sharing.linalg.fips import PAD_DIVISOR, fips_rank, kept_entries, orient, svd_init
from basis_sharing.linalg.pruning import GMPSchedule, magnitude_masks, two_four_mask
from basis_sharing.methods.fips import FiPS, FipsMethodConfig
from basis_sharing.methods.fips_train import compress_group
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.compressed_io import load_compressed, save_compressed
from basis_sharing.models.families import family_for_model_type, get_family
from basis_sharing.modules import SparseFactorLinear
from basis_sharing.modules.sparse_factor import pack_bits, unpack_bits

FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gpt2"]
CPU = torch.device("cpu")
IDS = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(9))


def fips(**kw) -> FiPS:
    cfg = OmegaConf.merge(OmegaConf.structured(FipsMethodConfig), {"name": "fips", **kw})
    return FiPS(cfg)


def setup(family_name: str = "llama", dtype=torch.float64):
    model = make_tiny_model(family_name, dtype=dtype)
    family = family_for_model_type(model.config.model_type)
    stats = collect_forward([get_statistic("mlp_inputs")], model, family, IDS, 4)
    return model, family, stats


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def fips_modules(model) -> list[SparseFactorLinear]:
    return [m for m in model.modules() if isinstance(m, SparseFactorLinear)]


# ---- the factorisation ------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("extra", [0, 5])  # r = d (the rank of M_G), and r > d (padded)
def test_full_rank_without_training_or_pruning_reproduces_the_dense_logits(family_name, extra):
    model, family, stats = setup(family_name)
    dense = logits(model)
    method = fips(group_size=2, steps=0)
    for plan in method.plan(model, family, CompressionContext(ratio=0.2, device=CPU)):
        full = dataclasses.replace(plan, rank=plan.d + extra)
        compress_group(model, family, full, stats["mlp_inputs"], method, CPU)
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=1e-9)
    assert {m.rank for m in fips_modules(model)} == {64 + extra}


def test_padding_adds_zero_u_columns_and_v_rows_scaled_by_one_over_32():
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    u, vs = svd_init(mats, 8)
    v = torch.cat(vs, dim=1)
    assert u.shape == (6, 8) and v.shape == (8, 20)
    assert torch.equal(u[:, 6:], torch.zeros(6, 2, dtype=torch.float64))
    torch.testing.assert_close(v[6:], v[:2] / PAD_DIVISOR, rtol=0, atol=0)
    torch.testing.assert_close(u @ v, torch.cat(mats, dim=1), rtol=0, atol=1e-12)


def test_orientation_puts_the_model_dimension_on_the_rows():
    up = torch.zeros(4, 12)  # W (d_in = d, d_out = d_ff)
    down = torch.zeros(12, 4)
    assert orient(up, 4) == (up, False)
    m, transposed = orient(down, 4)
    assert transposed and m.shape == (4, 12)
    with pytest.raises(ValueError, match="no side of the model dimension"):
        orient(torch.zeros(5, 6), 4)


def test_the_rank_rule_uses_the_real_shapes():
    # Llama-3.1-8B, 4 blocks, half the MLP kept, V 75 % sparse: d_ff = 14336 = 3.5 d.
    d, d_ff, n = 4096, 14336, 4
    r = fips_rank(d, [d_ff] * 3 * n, 0.5, 0.75)
    total = 3 * n * d_ff
    assert r == math.floor(0.5 * d * total / (d + 0.25 * total))
    assert d * r + 0.25 * r * total <= 0.5 * d * total < d * (r + 1) + 0.25 * (r + 1) * total
    assert r > d  # so U is padded
    assert fips_rank(d, [d_ff] * 3 * n, 0.5, 0.75, multiple=64) == r - r % 64


# ---- gradual magnitude pruning --------------------------------------------------------------


def test_both_schedules_match_hand_computed_sparsities():
    common = dict(steps=200, final=0.75, initial=0.05, accel=0.5, t_accel=80, t_end=150, delta_t=50)
    exact = GMPSchedule(**common)
    released = GMPSchedule(**common, schedule="released")
    assert exact.update_steps() == released.update_steps() == [0, 100, 150]
    assert exact.sparsity(0) == released.sparsity(0) == 0.05
    assert exact.sparsity(80) == released.sparsity(80) == 0.5
    assert exact.sparsity(100) == pytest.approx(0.75 - 0.25 * (1 - 20 / 70) ** 3)
    assert released.sparsity(100) == pytest.approx(0.75 - 0.25 * (1 - 20 / 150) ** 3)
    assert exact.reached() == 0.75  # exactly the target
    assert released.reached() == pytest.approx(0.75 - 0.25 * (80 / 150) ** 3)  # t_accel/t_end
    assert round(released.reached(), 3) == 0.712  # the released code's 71.2 %
    # t_end not a multiple of delta_t: the exact schedule still updates at t_end.
    odd = GMPSchedule(**{**common, "t_end": 140})
    assert odd.update_steps() == [0, 100, 140] and odd.reached() == 0.75
    assert GMPSchedule(**{**common, "t_end": 140}, schedule="released").update_steps() == [0, 100]


def test_magnitude_masks_are_global_and_keep_exactly_the_planned_count():
    a = torch.tensor([[1.0, -5.0], [0.1, 3.0]])
    b = torch.tensor([[4.0, -0.2, 2.0]])
    ma, mb = magnitude_masks([a, b], 4 / 7)
    assert ma.tolist() == [[False, True], [False, True]] and mb.tolist() == [[True, False, False]]
    x = torch.randn(10, 30)
    assert int(magnitude_masks([x], 0.75)[0].sum()) == kept_entries(300, 0.75) == 75


def test_two_four_masks_keep_two_of_every_four_along_the_input_side():
    x = torch.randn(8, 12)
    for dim in (0, 1):
        mask = two_four_mask(x, dim)
        groups = mask.movedim(dim, -1).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all()


def test_the_bitmask_round_trips():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(2)) > 0.4
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(91 / 8)
    assert torch.equal(unpack_bits(bits, 7, 13), mask)


# ---- training, counting, storage --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA compressed by FiPS with training and pruning to 50 %, U of rank 43 < d."""
    model, family, stats = setup("llama", dtype=torch.float32)
    method = fips(group_size=2, sparsity=0.5, steps=60, batch_tokens=64, lr=1e-3, delta_t=10)
    ctx = CompressionContext(ratio=0.6, device=CPU, stats=stats)
    info = method.compress(model, family, ctx)
    return model, family, method, info


def test_training_lowers_every_mlps_loss_below_its_svd_initialisation(trained):
    _, _, _, info = trained
    entries = [e for g in info["block_groups"] for e in g["mlps"]]
    assert len(entries) == 4
    for e in entries:
        assert e["final_loss"] < e["initial_loss"], e
        assert e["group_final_loss"] < e["initial_loss"], e
        assert e["final_loss"] < e["one_shot_pruned_loss"], e  # better than pruning once


def test_the_default_schedule_ends_with_exactly_the_target_sparsity(trained):
    model, _, _, info = trained
    for e in (e for g in info["block_groups"] for e in g["mlps"]):
        assert e["sparsity"] == 0.5 and e["schedule_sparsity"] == 0.5
    for m in fips_modules(model):
        assert m.nnz == int(m.mask().sum())


def test_the_planned_count_is_the_counted_nonzeros_plus_u_once_per_group(trained):
    model, family, _, info = trained
    nnz = sum(m.nnz for m in fips_modules(model))
    u = sum(model.shared_bases[g["basis_key"]].weight.numel() for g in info["block_groups"])
    mlp = ("up", "gate", "down")
    counted = count_projection_weights(model, family, mlp)
    assert counted == nnz + u == sum(g["d"] * g["rank"] for g in info["block_groups"]) + nnz
    planned = info["planned_params"]["kept"]
    dense = make_tiny_model("llama")  # the same shapes, uncompressed
    attention = dense_projection_weights(dense, family) - dense_projection_weights(
        dense, family, mlp
    )
    assert planned == counted + attention
    storage = info["storage"]
    assert storage["params"] == counted and storage["nonzeros"] == nnz
    assert storage["bytes"] == 4 * (nnz + u) + sum(m.mask_bits.numel() for m in fips_modules(model))


def test_the_shared_u_is_one_tensor_per_group(trained):
    model, family, _, info = trained
    layers = family.layers(model)
    for g in info["block_groups"]:
        basis = model.shared_bases[g["basis_key"]]
        for layer in g["layers"]:
            for kind in g["kinds"]:
                assert family.module(layers[layer], kind).basis is basis
    assert len(model.shared_bases) == len(info["block_groups"]) == 2


def test_save_and_load_give_identical_logits_and_the_same_nonzeros(trained, tmp_path):
    from safetensors import safe_open

    model, family, _, info = trained
    save_compressed(model, tmp_path / "m", family=family)
    loaded = load_compressed(tmp_path / "m")
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)
    assert [m.nnz for m in fips_modules(loaded.model)] == [m.nnz for m in fips_modules(model)]
    assert [m.transposed for m in fips_modules(loaded.model)] == [False, False, True] * 4
    # On disk V is its values and a bitmask, U one tensor per group: the storage report's bytes.
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if ".mlp." in k or "shared_bases" in k}
    assert {k.rsplit(".", 1)[1] for k in stored} == {"values", "mask_bits", "weight"}
    assert sum(t.numel() * t.element_size() for t in stored.values()) == info["storage"]["bytes"]


def test_the_joint_u_pass_trains_u_on_every_member():
    model, family, stats = setup("llama", dtype=torch.float32)
    method = fips(group_size=2, steps=20, batch_tokens=64, lr=1e-3, u_update="joint")
    info = method.compress(model, family, CompressionContext(ratio=0.3, device=CPU, stats=stats))
    for g in info["block_groups"]:
        joint = g["joint"]
        assert joint["steps"] == 20
        assert sum(joint["losses_after"]) < sum(joint["losses_before"])
        assert [e["group_final_loss"] for e in g["mlps"]] == joint["losses_after"]


# ---- settings -----------------------------------------------------------------------------


def test_ratio_of_decoder_removes_the_total_budget_from_the_mlp():
    model = make_tiny_model("llama")
    family = get_family("llama")
    all_weights = dense_projection_weights(model, family)
    mlp = dense_projection_weights(model, family, ("up", "gate", "down"))
    method = fips(ratio_of="decoder")
    assert method.budget_kinds(family) is None
    assert method.kinds_ratio(model, family, 0.2) == pytest.approx(0.2 * all_weights / mlp)
    with pytest.raises(ConfigError, match="would remove"):
        method.kinds_ratio(model, family, 0.9)


def test_ratio_of_decoder_compresses_and_records_the_mlp_ratio():
    """The MLP ratio is read from the dense shapes, before the surgery replaces them."""
    model, family, stats = setup("llama")
    all_weights = dense_projection_weights(model, family)
    mlp = dense_projection_weights(model, family, ("up", "gate", "down"))
    method = fips(ratio_of="decoder", group_size=2, steps=0)
    info = method.compress(model, family, CompressionContext(ratio=0.2, device=CPU, stats=stats))
    assert info["mlp_ratio"] == pytest.approx(0.2 * all_weights / mlp)


def test_explicit_groups_must_cover_every_layer_once():
    method = fips(groups=[[0, 1], [2, 3]])
    assert method.block_groups(4) == [(0, 1), (2, 3)]
    with pytest.raises(ConfigError, match="exactly once"):
        fips(groups=[[0, 1], [1, 2, 3]]).block_groups(4)


@pytest.mark.parametrize(
    ("settings", "family_name", "message"),
    [
        ({}, "opt", "computes its MLP inside the decoder layer"),
        ({"kinds": ["q"]}, "llama", "Valid choices: down, gate, up"),
        ({"structure": "2:4", "sparsity": 0.75}, "llama", "set method.sparsity=0.5"),
        ({"sparsity": 1.0}, "llama", r"method.sparsity=1.0 must be in \[0.0, 1.0\)"),
        ({"u_update": "together"}, "llama", "Valid choices: joint, sequential"),
        ({"accel_sparsity": 0.6, "sparsity": 0.5}, "llama", "<= method.sparsity"),
        ({"steps": -1}, "llama", "method.steps=-1 must be >= 0"),
    ],
)
def test_bad_settings_are_refused(settings, family_name, message):
    with pytest.raises(ConfigError, match=message):
        fips(**settings).check_config(get_family(family_name))


# ---- the run ------------------------------------------------------------------------------


def run_overrides(model_dir, mirror, tmp_path, *extra):
    return tiny_run_overrides(
        model_dir,
        mirror,
        f"paths.cache_dir={tmp_path}/cache",
        "eval.ppl_datasets=[wikitext2]",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=4",
        "calibration.seq_len=32",
        "method=fips",
        "method.group_size=2",
        "method.steps=10",
        "method.batch_tokens=64",
        "method.sparsity=0.5",
        "ratio=0.3",
        "ratio_tolerance=0.02",
        *extra,
    )


def test_a_fips_run_records_both_ratios_the_storage_and_reloads(
    tiny_model_dir, tiny_mirror, tmp_path
):
    from basis_sharing import pipeline
    from basis_sharing.tracking.schema import validate_record

    cfg = compose_config(*run_overrides(tiny_model_dir, tiny_mirror, tmp_path, "save_model=true"))
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert validate_record(record) == []
    params, info = record["params"], record["method_info"]
    assert params["budget"]["kinds"] == ["up", "gate", "down"]
    assert abs(params["budget"]["achieved_ratio"] - 0.3) <= 0.02
    assert params["achieved_ratio"] < params["budget"]["achieved_ratio"]
    assert record["preflight"]["predicted_ratio"] == params["budget"]["achieved_ratio"]
    assert info["storage"]["params"] == params["budget"]["kept"]
    assert info["mlp_inputs"]["bytes"] == 4 * 4 * 32 * 64 * 4  # layers x tokens x d x 4 bytes
    assert record["calibration"]["mlp_inputs"]["cache_hit"] is False
    loaded = pipeline.run(
        compose_config(
            *tiny_run_overrides(tiny_model_dir, tiny_mirror, f"paths.cache_dir={tmp_path}/c2"),
            "eval.ppl_datasets=[wikitext2]",
            "method=none",
            f"load_model={record['saved_model']}",
        ),
        out_dir=tmp_path / "load",
    )
    assert loaded["metrics"]["perplexity"] == record["metrics"]["perplexity"]
    again = pipeline.run(cfg, out_dir=tmp_path / "again")  # the MLP inputs come from the cache
    assert again["calibration"]["mlp_inputs"]["cache_hit"] is True
    assert again["metrics"]["perplexity"] == record["metrics"]["perplexity"]


def test_fips_with_a_sequential_runtime_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load
):
    from basis_sharing import pipeline

    cfg = compose_config(
        *run_overrides(tiny_model_dir, tiny_mirror, tmp_path, "runtime=sequential")
    )
    with pytest.raises(ConfigError, match="fips"):
        pipeline.validate(cfg)


def test_structure_two_four_leaves_two_of_every_four_along_each_slices_input_side():
    model, family, stats = setup("llama", dtype=torch.float32)
    method = fips(
        group_size=2,
        sparsity=0.5,
        structure="2:4",
        rank_multiple=4,
        steps=10,
        batch_tokens=64,
        delta_t=2,
    )
    info = method.compress(model, family, CompressionContext(ratio=0.6, device=CPU, stats=stats))
    modules = fips_modules(model)
    assert len(modules) == 12 and all(g["rank"] % 4 == 0 for g in info["block_groups"])
    for m in modules:
        assert m.structure == "2:4"
        mask = m.mask()  # (r, w); the product reduces over r (up, gate) or w (down)
        runs = (mask if m.transposed else mask.T).reshape(-1, 4)
        assert (runs.sum(dim=1) == 2).all()
    with pytest.raises(ValueError, match="not 2:4"):
        fips_modules(trained_model_without_structure())[0].to_semi_structured()


def trained_model_without_structure():
    model, family, stats = setup("llama", dtype=torch.float32)
    fips(group_size=2, steps=0).compress(
        model, family, CompressionContext(ratio=0.3, device=CPU, stats=stats)
    )
    return model


def test_lora_finds_the_dense_attention_and_predicts_it_from_the_plan(trained):
    from basis_sharing.finetune.targets import candidates, planned_candidates, select

    model, family, method, _ = trained
    dense = make_tiny_model("llama")
    plans = method.shape_plan(dense, family, 0.6)
    built = candidates(model, family)
    assert planned_candidates(plans, family, 4) == built
    assert {c.role for c in built} == {"dense"}  # U and the sparse V offer no Linear child
    chosen = select(built, "paper")
    assert {c.kind for c in chosen} == {"q", "v"} and len(chosen) == 8
    with pytest.raises(ConfigError, match="matches no module"):
        select(built, "shared_bases")
