"""Fine-tuning after compression (finetune=lora, finetune=full) on tiny models of every family.

The compressed models are built here directly (random factors, layers grouped in pairs), so the
adapter counts have an independent oracle: the structure the test itself installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model
from omegaconf import OmegaConf

import basis_sharing.finetune  # noqa: F401  (registers lora and full)
from basis_sharing.errors import ConfigError
from basis_sharing.finetune import loop
from basis_sharing.finetune.common import count_parameters
from basis_sharing.finetune.full import FullFinetuneConfig, FullFinetuner
from basis_sharing.finetune.lora import LoraFinetuneConfig, LoraFinetuner, lora_layers, merge
from basis_sharing.finetune.registry import FinetuneContext
from basis_sharing.models.compressed_io import load_compressed, save_compressed
from basis_sharing.models.families import family_for_model_type
from basis_sharing.modules import (
    LowRankLinear,
    SharedBasisLinear,
    basis_linear,
    coefficient_linear,
    shared_bases,
)

FAMILIES = ["llama", "mistral", "opt", "gpt2", "qwen2", "gemma2"]
CPU = torch.device("cpu")
RANK = 8
PROBE = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def compress(model, family, seed: int = 0):
    """Shared kinds: one basis per pair of layers (``<kind>_g<i>``); private kinds: low rank."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    registry = shared_bases(model)
    for kind in family.kinds:
        for i, layer in enumerate(family.layers(model)):
            d_in, d_out = family.shape(layer, kind)
            bias = family.bias(layer, kind)
            c = torch.randn(RANK, d_out, generator=g, dtype=torch.float64) / RANK**0.5
            coefficient = coefficient_linear(c.to(dtype), None if bias is None else bias, dtype)
            if kind in family.shared:
                key = f"{kind}_g{i // 2}"
                if key not in registry:
                    b = torch.randn(d_in, RANK, generator=g, dtype=torch.float64) / d_in**0.5
                    registry[key] = basis_linear(b.to(dtype), dtype)
                new = SharedBasisLinear(registry, key, coefficient)
            else:
                b = torch.randn(d_in, RANK, generator=g, dtype=torch.float64) / d_in**0.5
                new = LowRankLinear(basis_linear(b.to(dtype), dtype), coefficient)
            family.set_module(layer, kind, new)
    return model


def tiny(family_name: str = "llama", dtype=torch.float32, seed: int = 0):
    model = make_tiny_model(family_name, dtype=dtype, seed=seed)
    family = family_for_model_type(model.config.model_type)
    return compress(model, family, seed), family


def lora_cfg(**kw):
    base = {"name": "lora", "train_split": "validation", "block_len": 32, "steps_per_epoch": 3}
    return OmegaConf.merge(OmegaConf.structured(LoraFinetuneConfig), {**base, **kw})


def full_cfg(**kw):
    base = {"name": "full", "train_split": "validation", "block_len": 32, "steps_per_epoch": 2}
    return OmegaConf.merge(OmegaConf.structured(FullFinetuneConfig), {**base, **kw})


def context(tokenizer, mirror, out_dir) -> FinetuneContext:
    return FinetuneContext(CPU, tokenizer, out_dir, str(mirror), True, 0, 64, "test")


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(PROBE).logits


def randomize_lora_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g, dtype=torch.float64) * 0.1)


def expected_counts(model, family) -> dict[str, dict[str, int]]:
    """The oracle: adapters per role for each choice, from the structure ``compress`` built."""
    n_layers = len(family.layers(model))
    shared = [k for k in family.kinds if k in family.shared]
    private = [k for k in family.kinds if k not in family.shared]
    paper = [k for k in family.kinds if k in ("q", "v", "attn")]
    n_groups = (n_layers + 1) // 2
    return {
        "paper": {"coefficient": n_layers * len(paper)},
        "coefficients": {"coefficient": n_layers * len(family.kinds)},
        "shared_bases": {"shared_basis": n_groups * len(shared)},
        "all": {
            "coefficient": n_layers * len(family.kinds),
            "private_basis": n_layers * len(private),
            "shared_basis": n_groups * len(shared),
        },
    }


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("targets", ["paper", "coefficients", "shared_bases", "all"])
def test_adapter_count_per_targets_choice_one_per_shared_basis(family_name, targets):
    from peft.tuners.lora import LoraLayer

    model, family = tiny(family_name)
    wrapped, adapters = LoraFinetuner(lora_cfg(targets=targets)).adapt(model, family)
    expected = expected_counts(model, family)[targets]
    assert adapters["by_role"] == expected
    assert adapters["count"] == len(lora_layers(model)) == sum(expected.values())
    if "shared_basis" in expected:
        registry = model.shared_bases
        assert all(isinstance(registry[key], LoraLayer) for key in registry)
        assert set(adapters["shared_bases"]) == {f"shared_bases.{key}" for key in registry}
        for module in model.modules():
            if isinstance(module, SharedBasisLinear):
                assert module.basis is registry[module.basis_key]
        # One LoRA layer per basis although two layers compute with it.
        assert sum(1 for m in model.modules() if m in list(registry.values())) == len(registry)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_member_of_a_group_sees_its_bases_adapter(family_name):
    model, family = tiny(family_name)
    LoraFinetuner(lora_cfg(targets="shared_bases")).adapt(model, family)
    members = {name: m for name, m in model.named_modules() if isinstance(m, SharedBasisLinear)}
    key = next(iter(model.shared_bases))
    x = torch.randn(
        3, members[next(iter(members))].d_in, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        before = {name: m(x) for name, m in members.items() if m.d_in == x.shape[-1]}
        adapter = model.shared_bases[key].lora_B["default"].weight
        adapter.copy_(torch.randn(adapter.shape, generator=torch.Generator().manual_seed(2)))
        after = {name: m(x) for name, m in members.items() if name in before}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    users = {name for name in before if members[name].basis_key == key}
    assert len(users) == 2 and changed == users


@pytest.mark.parametrize("family_name", FAMILIES)
def test_zero_lora_b_leaves_the_logits_unchanged(family_name):
    model, family = tiny(family_name)
    reference = logits(model)
    wrapped, _ = LoraFinetuner(lora_cfg(targets="all")).adapt(model, family)
    assert all(
        not layer.lora_B["default"].weight.any() for _, layer in lora_layers(model)
    )  # PEFT starts B at zero
    assert torch.equal(logits(wrapped), reference)


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("targets", ["paper", "all"])
def test_merged_logits_equal_the_wrapped_ones_and_the_count_is_kept(family_name, targets):
    model, family = tiny(family_name, dtype=torch.float64)
    count = count_parameters(model)
    wrapped, _ = LoraFinetuner(lora_cfg(targets=targets)).adapt(model, family)
    randomize_lora_b(model)
    adapted = logits(wrapped)
    assert not torch.allclose(adapted, logits(tiny(family_name, dtype=torch.float64)[0]))
    merged = merge(wrapped, model)
    assert merged is model and not lora_layers(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-6, rtol=0)
    assert count_parameters(model) == count
    for module in model.modules():
        if isinstance(module, SharedBasisLinear):
            assert module.basis is model.shared_bases[module.basis_key]


def test_save_and_load_of_the_merged_model_give_identical_logits(tiny_tokenizer, tmp_path):
    model, family = tiny("llama")
    wrapped, _ = LoraFinetuner(lora_cfg(targets="all")).adapt(model, family)
    randomize_lora_b(model)
    merge(wrapped, model)
    save_compressed(model, tmp_path / "saved", family=family, tokenizer=tiny_tokenizer, info={})
    loaded = load_compressed(tmp_path / "saved").model
    assert torch.equal(logits(loaded), logits(model))


def block_loss(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.eval()(blocks, labels=blocks).loss)


@pytest.mark.parametrize("targets", ["paper", "shared_bases"])
def test_a_few_lora_steps_lower_the_training_loss(targets, tiny_tokenizer, tiny_mirror, tmp_path):
    model, family = tiny("llama")
    finetuner = LoraFinetuner(lora_cfg(targets=targets, lr=3e-3, epochs=1, steps_per_epoch=6))
    ctx = context(tiny_tokenizer, tiny_mirror, tmp_path)
    train_set, _ = finetuner.blocks(ctx)
    used = train_set.blocks[loop.epoch_order(train_set.blocks.shape[0], 0, 0)[:6]]
    before = block_loss(model, used)
    count = count_parameters(model)
    report = finetuner.finetune(model, family, ctx)
    assert block_loss(model, used) < before
    assert count_parameters(model) == count == report["params_after"]
    assert len(report["train_loss"]) == 6 and report["steps"] == list(range(1, 7))
    assert report["tokens_seen"] == 6 * 32 and report["epochs"] == 1
    assert report["data"]["train"]["split"] == "validation"
    held = report["data"]["eval"]
    assert held["first_block"] == report["data"]["train"]["blocks"]  # the held-out tail


def test_full_finetuning_keeps_each_shared_basis_one_tensor(tiny_tokenizer, tiny_mirror, tmp_path):
    model, family = tiny("llama")
    registry = model.shared_bases
    bases = {key: registry[key].weight.detach().clone() for key in registry}
    count = count_parameters(model)
    report = FullFinetuner(full_cfg(lr=1e-3, max_grad_norm=1.0, grad_accum=2, epochs=1)).finetune(
        model, family, context(tiny_tokenizer, tiny_mirror, tmp_path)
    )
    assert report["trainable_params"] == count == count_parameters(model)
    for module in model.modules():
        if isinstance(module, SharedBasisLinear):
            assert module.basis is registry[module.basis_key]
    assert all(not torch.equal(registry[key].weight, bases[key]) for key in registry)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    "finetuner",
    [
        lambda: LoraFinetuner(lora_cfg(targets="all", lr=1e-3)),
        lambda: FullFinetuner(full_cfg(lr=1e-3, max_grad_norm=1.0, epochs=2)),
    ],
    ids=["lora", "full"],
)
def test_an_interrupted_run_resumes_from_its_epoch_checkpoint_bit_for_bit(
    finetuner, tiny_tokenizer, tiny_mirror, tmp_path, monkeypatch
):
    model, family = tiny("llama")
    straight = finetuner().finetune(
        model, family, context(tiny_tokenizer, tiny_mirror, tmp_path / "a")
    )
    reference = state(model)

    def stop(epoch):
        if epoch == 1:
            raise Interrupted

    monkeypatch.setattr(loop, "epoch_done", stop)
    run_dir = tmp_path / "b"
    with pytest.raises(Interrupted):
        model, family = tiny("llama")
        finetuner().finetune(model, family, context(tiny_tokenizer, tiny_mirror, run_dir))
    assert (run_dir / "finetune" / "epoch_checkpoint.safetensors").is_file()
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pt"))  # no pickle
    model, family = tiny("llama")
    resumed = finetuner().finetune(model, family, context(tiny_tokenizer, tiny_mirror, run_dir))
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 2
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["eval_loss"] == straight["eval_loss"]
    after = state(model)
    assert after.keys() == reference.keys()
    assert all(torch.equal(after[k], reference[k]) for k in reference)


def test_a_checkpoint_of_another_configuration_is_not_resumed(
    tiny_tokenizer, tiny_mirror, tmp_path, monkeypatch
):
    model, family = tiny("llama")
    ctx = context(tiny_tokenizer, tiny_mirror, tmp_path)
    LoraFinetuner(lora_cfg(epochs=1)).finetune(model, family, ctx)
    model, family = tiny("llama")
    ctx.fingerprint = "another run"
    report = LoraFinetuner(lora_cfg(epochs=1)).finetune(model, family, ctx)
    assert report["resumed_from_epoch"] is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"targets": "papr"}, r"Unknown finetune.targets 'papr'.*Did you mean 'paper'"),
        ({"targets": []}, "non-empty list of module-name patterns"),
        ({"lr": 0.0}, r"finetune.lr=0.0 must be > 0"),
        ({"lr": -1e-4}, r"finetune.lr=-0.0001 must be > 0"),
        ({"epochs": 0}, "finetune.epochs=0 must be >= 1"),
        ({"batch_size": 0}, "finetune.batch_size=0 must be >= 1"),
        ({"grad_accum": 0}, "finetune.grad_accum=0 must be >= 1"),
        ({"train_split": "dev"}, r"Unknown split of dataset wikitext2 'dev'"),
        ({"bias": "some"}, "finetune.bias='some'"),
    ],
)
def test_bad_settings_are_refused_with_their_message(settings, message):
    with pytest.raises(ConfigError, match=message):
        LoraFinetuner(lora_cfg(**settings)).check_config()


def test_a_pattern_matching_nothing_lists_what_exists():
    model, family = tiny("llama")
    finetuner = LoraFinetuner(lora_cfg(targets=["*.q_proj.coefficient", "*.qproj*"]))
    with pytest.raises(ConfigError, match=r"pattern '\*\.qproj\*' matches no module") as err:
        finetuner.adapt(model, family)
    assert "model.layers.0.self_attn.q_proj.coefficient" in str(err.value)
    assert "shared_bases.q_g0" in str(err.value)


def test_shared_bases_on_a_model_without_any_is_refused():
    model = make_tiny_model("llama")  # dense: no shared basis
    family = family_for_model_type(model.config.model_type)
    with pytest.raises(ConfigError, match="targets=shared_bases matches no module.*28 dense"):
        LoraFinetuner(lora_cfg(targets="shared_bases")).adapt(model, family)


def test_lora_on_a_dense_model_adapts_the_dense_q_and_v():
    model = make_tiny_model("llama")
    family = family_for_model_type(model.config.model_type)
    _, adapters = LoraFinetuner(lora_cfg()).adapt(model, family)
    assert adapters["by_role"] == {"dense": 8} and adapters["by_kind"] == {"q": 4, "v": 4}


# ---- the run: validation before any model is loaded, and the stage end to end ----------------


def run_overrides(model_dir, mirror, tmp_path, *extra):
    from conftest import tiny_run_overrides

    return tiny_run_overrides(
        model_dir,
        mirror,
        f"paths.cache_dir={tmp_path}/cache",
        "eval.ppl_datasets=[wikitext2]",
        "method=svd",
        "ratio=0.3",
        "ratio_tolerance=0.05",
        *extra,
    )


def test_a_training_split_missing_from_the_mirror_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load
):
    from conftest import compose_config

    from basis_sharing import pipeline
    from basis_sharing.errors import DataNotFoundError

    cfg = compose_config(
        *run_overrides(tiny_model_dir, tiny_mirror, tmp_path, "finetune=lora", "offline=true")
    )
    with pytest.raises(DataNotFoundError) as err:
        pipeline.run(cfg, out_dir=tmp_path / "run")
    message = str(err.value)
    assert "finetune.train_split" in message and "wiki.train.raw" in message
    assert "python scripts/prepare_data.py" in message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["finetune.block_len=65"], "finetune.block_len=65 is longer than model.context_length=64"),
        (["finetune.lr=0"], "finetune.lr=0.0 must be > 0"),
        (["finetune.epochs=0"], "finetune.epochs=0 must be >= 1"),
        (["finetune.batch_size=0"], "finetune.batch_size=0 must be >= 1"),
        (["finetune.targets=sharedbases"], "Did you mean 'shared_bases'"),
    ],
)
def test_bad_finetune_settings_fail_validation(
    extra, message, tiny_model_dir, tiny_mirror, tmp_path
):
    from conftest import compose_config

    from basis_sharing import pipeline

    cfg = compose_config(
        *run_overrides(tiny_model_dir, tiny_mirror, tmp_path, "finetune=lora", *extra)
    )
    with pytest.raises(ConfigError, match=message):
        pipeline.validate(cfg)


def test_the_finetune_stage_merges_saves_and_reloads(tiny_model_dir, tiny_mirror, tmp_path):
    from conftest import compose_config

    from basis_sharing import pipeline
    from basis_sharing.tracking.schema import validate_record

    settings = [
        "finetune=lora",
        "finetune.train_split=validation",
        "finetune.block_len=32",
        "finetune.steps_per_epoch=2",
        "finetune.epochs=1",
        "finetune.targets=coefficients",
        "finetune.save_adapter=true",
    ]
    cfg = compose_config(
        *run_overrides(tiny_model_dir, tiny_mirror, tmp_path, *settings, "save_model=true")
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert validate_record(record) == []
    assert list(record["stages"])[-3:] == ["finetune", "save_model", "perplexity"]
    ft = record["finetune"]
    assert ft["name"] == "lora" and ft["adapters"]["by_role"] == {"coefficient": 28}
    assert ft["params_before"] == ft["params_after"] == record["params"]["total"]
    assert (tmp_path / "run" / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = pipeline.run(
        compose_config(
            *run_overrides(tiny_model_dir, tiny_mirror, tmp_path, "method=none"),
            f"load_model={record['saved_model']}",
        ),
        out_dir=tmp_path / "load",
    )
    assert loaded["metrics"]["perplexity"] == record["metrics"]["perplexity"]
    assert loaded["params"]["decoder_projections"] == record["params"]["decoder_projections"]


def test_the_finetune_section_is_validated_and_its_losses_go_to_wandb_as_series():
    from basis_sharing.tracking.schema import FinetuneSummary, _check_object
    from basis_sharing.tracking.wandb_logger import log_finetune_series

    section = {
        "name": "lora",
        "steps": [1, 2, 3],
        "train_loss": [3.0, 2.5, 2.25],
        "eval_loss": [2.4],
    }
    problems: list[str] = []
    _check_object({**section, "train_loss": "low"}, FinetuneSummary, "finetune", problems)
    assert problems == ["finetune.train_loss: expected array, got string"]

    class Run:
        def __init__(self):
            self.rows, self.metrics = [], {}

        def log(self, row):
            self.rows.append(row)

        def define_metric(self, name, step_metric=None):
            self.metrics[name] = step_metric

    run = Run()
    log_finetune_series(run, {"finetune": section})
    assert run.rows == [
        {"finetune.step": 1, "finetune.train_loss": 3.0},
        {"finetune.step": 2, "finetune.train_loss": 2.5},
        {"finetune.step": 3, "finetune.train_loss": 2.25},
        {"finetune.epoch": 1, "finetune.eval_loss": 2.4},
    ]
    assert run.metrics["finetune.train_loss"] == "finetune.step"
    assert run.metrics["finetune.eval_loss"] == "finetune.epoch"


# ---- targets checked from the rank plan, before any weight is loaded ---------------------------


def planned_and_built(family_name: str, method_settings: dict):
    """(candidates predicted from the method's plan, candidates of the model it builds)."""
    import basis_sharing.methods  # noqa: F401  (registers every method)
    from basis_sharing.finetune.targets import candidates, planned_candidates
    from basis_sharing.methods.factorized import install
    from basis_sharing.methods.registry import get_method

    model = make_tiny_model(family_name)
    family = family_for_model_type(model.config.model_type)
    method = get_method(OmegaConf.create(method_settings))
    plans = method.shape_plan(model, family, 0.3) if method.compresses else []
    predicted = planned_candidates(plans, family, len(family.layers(model)))
    layers = family.layers(model)
    for plan in plans:
        basis = torch.randn(plan.d_in, plan.rank)
        install(
            model,
            layers,
            family,
            plan,
            basis,
            [torch.randn(plan.rank, plan.d_out)] * len(plan.layers),
        )
    return predicted, candidates(model, family)


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize(
    "settings",
    [
        {"name": "basis_sharing", "group_size": 3},  # 4 layers: a group of 3 and one private
        {"name": "svd_llm"},
        {"name": "dense"},
    ],
    ids=["basis_sharing_g3", "svd_llm", "dense"],
)
def test_the_planned_candidates_are_those_of_the_built_model(family_name, settings):
    predicted, built = planned_and_built(family_name, settings)
    assert predicted == built
    roles = {c.role for c in built}
    if settings["name"] == "basis_sharing":
        assert {"coefficient", "shared_basis", "private_basis"} <= roles
    if settings["name"] == "dense":
        assert roles == {"dense"}


def test_a_pattern_matching_nothing_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, no_model_load
):
    from conftest import compose_config

    from basis_sharing import pipeline

    cfg = compose_config(
        *run_overrides(
            tiny_model_dir,
            tiny_mirror,
            tmp_path,
            "finetune=lora",
            "finetune.train_split=validation",
            "finetune.targets=[shared_bases.*]",  # method=svd: no shared basis
        )
    )
    with pytest.raises(ConfigError, match=r"pattern 'shared_bases\.\*' matches no module") as err:
        pipeline.run(cfg, out_dir=tmp_path / "run")
    assert "model.layers.0.self_attn.q_proj.coefficient" in str(err.value)
