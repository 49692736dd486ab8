"""Every option of every config group composes; typos and wrong types fail at compose time."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import basis_sharing.finetune  # noqa: F401  (registers the fine-tuners' schemas)
import basis_sharing.methods  # noqa: F401  (registers every method and its config schema)
from basis_sharing.config import PAPER_ZEROSHOT_TASKS, ZeroShotConfig, check_schema
from basis_sharing.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "method", "calibration", "finetune", "eval", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_dir():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield
    GlobalHydra.instance().clear()


def make(*overrides: str, hydra: bool = False):
    return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes(group, option):
    extra = ["model.local_path=/tmp/x"] if option == "local" else []
    cfg = make(f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in ("method", "finetune", "logger"):
        # A preset (method=fips_smollm) carries the name of the option it extends.
        assert resolved[group]["name"] == option or option.startswith(f"{resolved[group]['name']}_")
    if group == "model":
        assert resolved["model"]["name"] == option


def test_every_paper_model_is_configured():
    assert {
        "llama7b",
        "llama13b",
        "llama30b",
        "llama2_7b",
        "mistral7b",
        "opt6.7b",
        "gpt2",
        "smollm2_135m",
    } <= set(options("model"))
    for name in options("model"):
        cfg = make(f"model={name}", "model.local_path=/tmp/x")
        assert cfg.model.context_length == (1024 if name == "gpt2" else 2048)
        if name not in ("local", "smollm2_135m"):
            assert cfg.model.hf_id and cfg.model.family


def test_defaults_are_the_embedded_model_with_cpu_sized_settings():
    cfg = make()
    assert cfg.model.name == "smollm2_135m" and cfg.method.name == "basis_sharing"
    assert cfg.ratio == 0.2 and cfg.method.group_size == 2
    assert cfg.eval.max_windows == 4 and cfg.calibration.split == "validation"
    paper = make("model=llama7b")
    assert paper.eval.max_windows is None
    assert (paper.calibration.split, paper.calibration.n_samples) == ("train", 256)
    assert paper.calibration.seq_len == 2048 and paper.calibration.seed == 2023
    # An explicit choice on the command line beats the model's default.
    assert make("eval=paper").eval.max_windows is None


def test_typo_in_a_config_file_fails_at_compose_time(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "model" / "gpt2.yaml").read_text()
    (conf / "model" / "gpt2.yaml").write_text(text.replace("context_length:", "context_lenght:"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        with pytest.raises(ConfigCompositionException) as err:
            compose("config", overrides=["model=gpt2"])
    assert "Key 'context_lenght' not in 'ModelConfig'" in str(err.value)


def test_typo_in_an_override_fails_before_any_work():
    with pytest.raises(ConfigCompositionException):
        make("eval.max_windowz=3")
    with pytest.raises(ConfigCompositionException):
        make("method=dense", "method.group_size=2")  # dense has no group_size
    # `+key=value` appends bypass Hydra's check; the pipeline's schema check catches them.
    cfg = make("+eval.max_windowz=3")
    with pytest.raises(ConfigError, match="max_windowz"):
        check_schema(cfg)
    with pytest.raises(ConfigError, match="group_size"):
        check_schema(make("method=dense", "+method.group_size=2"))
    check_schema(make("model=gpt2"))


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as err:
        make("ratio=abc")
    assert isinstance(err.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException):
        make("model.context_length=long")


def test_unknown_model_lists_the_valid_choices():
    with pytest.raises(MissingConfigException) as err:
        make("model=llama70b")
    message = str(err.value)
    assert "llama70b" in message
    for name in options("model"):
        assert name in message


def test_sweep_subdirectories_are_named_by_overrides():
    cfg = make("ratio=0.3", "seed=1", "paths.data_dir=/abs/mirror", hydra=True)
    # Paths (which would nest directories) are left out of the name; swept values are in it.
    assert cfg.hydra.sweep.subdir == "ratio=0.3,seed=1"


def test_long_sweep_directory_names_are_shortened_with_a_hash():
    from basis_sharing.config import MAX_SUBDIR, job_subdir

    assert job_subdir("method=svd,ratio=0.3") == "method=svd,ratio=0.3"
    assert job_subdir("paths.x=/a/b") == "paths.x=_a_b"  # never nests directories
    long_a, long_b = "a=" + "x" * 300, "a=" + "x" * 299 + "y"
    assert len(job_subdir(long_a)) == MAX_SUBDIR and job_subdir(long_a) != job_subdir(long_b)
    assert job_subdir(long_a).startswith("a=xxx")


def test_a_typo_in_a_method_key_fails_at_compose_time():
    for method, schema in (
        ("basis_sharing", "BasisSharingMethodConfig"),
        ("asvd", "ASVDMethodConfig"),
    ):
        with pytest.raises(ConfigCompositionException) as err:
            make(f"method={method}", "method.alpah=1")
        assert f"Key 'alpah' not in '{schema}'" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        make("method=asvd", "method.alpha=half")  # a wrongly typed value of a known key
    assert isinstance(err.value.__cause__, ValidationError)


# ---- the zero-shot tasks: one list (config.PAPER_ZEROSHOT_TASKS), every other place derived ----


def test_the_zero_shot_tasks_are_one_list_everywhere():
    from basis_sharing.evaluation.zeroshot import PAPER_TASKS, TASK_SOURCES
    from basis_sharing.tables.specs import ZEROSHOT_LABELS, ZEROSHOT_TASKS, accuracy_columns

    # Table 1's column order, written out here as the oracle.
    paper_order = "openbookqa arc_easy winogrande hellaswag arc_challenge piqa mathqa".split()
    assert list(PAPER_ZEROSHOT_TASKS) == paper_order
    assert list(PAPER_TASKS) == paper_order and set(TASK_SOURCES) == set(paper_order)
    assert all(task.name == name for name, task in PAPER_TASKS.items())
    assert list(ZEROSHOT_TASKS) == paper_order and set(ZEROSHOT_LABELS) == set(paper_order)
    columns = [c.metric for c in accuracy_columns()]
    assert columns == [*(f"acc.{t}" for t in paper_order), "acc.mean"]
    assert ZeroShotConfig().tasks == paper_order
    for option in ("paper", "quick"):  # they take the schema's default instead of a copy
        assert list(make(f"eval={option}").eval.zeroshot.tasks) == paper_order
    assert list(make("eval=ppl").eval.zeroshot.tasks) == []


def test_prepare_data_mirrors_exactly_the_paper_tasks_with_their_splits():
    from basis_sharing.evaluation.zeroshot import PAPER_TASKS

    path = CONF.parent / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_for_test_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert set(module.LM_EVAL_TASKS) == set(PAPER_ZEROSHOT_TASKS)
    assert {n: s.split for n, s in module.LM_EVAL_TASKS.items()} == {
        n: t.split for n, t in PAPER_TASKS.items()
    }
