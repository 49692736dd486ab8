"""Every experiment config composes, sweeps what its paper table needs, and every job composes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from basis_sharing.config import check_schema, job_subdir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RATIOS = "0.2,0.3,0.4,0.5"
METHODS = "dense,svd,fwsvd,asvd,svd_llm,basis_sharing"
BASELINES_FWSVD_LAST = "svd,asvd,svd_llm,basis_sharing,fwsvd"
# name -> (sweeper params, fixed settings of the composed base config)
EXPECTED = {
    "table1": (
        {"method": METHODS, "ratio": RATIOS},
        {"model.name": "llama7b", "eval.max_windows": None, "calibration.split": "train"},
    ),
    "table2": (
        {"calibration": "wikitext2,alpaca", "method": "dense,basis_sharing", "ratio": RATIOS},
        {"model.name": "llama2_7b", "eval.max_windows": None},
    ),
    "table3": (
        {"method": BASELINES_FWSVD_LAST, "model": "opt6.7b,llama2_7b,mistral7b"},
        {"ratio": 0.2, "eval.ppl_datasets": ["wikitext2"], "eval.zeroshot.tasks": []},
    ),
    "table4": (
        {"method": BASELINES_FWSVD_LAST, "model": "llama7b,llama13b,llama30b"},
        {"ratio": 0.2, "eval.ppl_datasets": ["wikitext2"]},
    ),
    "table5": (
        {"method": "basis_sharing"},
        {"model.name": "gpt2", "ratio": 0.2, "eval.ppl_datasets": ["wikitext2"]},
    ),
    "table6": (
        {"method.group_size": "1,2,3,4,5,6,7,8,16,32", "ratio": RATIOS},
        {"model.name": "llama7b", "method.name": "basis_sharing", "finetune.name": "none"},
    ),
    "table7": (
        {"finetune": "lora", "method.group_size": "1,2,3,4,5,6,7,8,16,32", "ratio": RATIOS},
        {"model.name": "llama7b", "method.name": "basis_sharing"},
    ),
    "table8": (
        {"finetune": "full", "method.group_size": "2,4,8,16,32", "ratio": RATIOS},
        {"model.name": "llama7b", "method.name": "basis_sharing"},
    ),
    "finetune_smollm": (
        {"ratio": "0.2,0.5"},
        {
            "model.name": "smollm2_135m",
            "method.name": "basis_sharing",
            "finetune.name": "lora",
            "finetune.train_split": "validation",
            "eval.max_windows": 16,
        },
    ),
    "fips_smollm": (
        {"ratio": "0.2,0.4"},
        {
            "model.name": "smollm2_135m",
            "method.name": "fips",
            "method.steps": 50,
            "eval.max_windows": 16,
            "eval.zeroshot.limit": 100,
        },
    ),
    "plus_smollm": (
        {"ratio": "0.2,0.3,0.4,0.5"},
        {
            "model.name": "smollm2_135m",
            "method.name": "basis_sharing",
            "eval.max_windows": 16,
            "eval.dataset_windows.ptb": 4,
            "eval.dataset_windows.c4": 4,
        },
    ),
    "table_smollm": (
        {"method": METHODS, "ratio": RATIOS},
        {
            "model.name": "smollm2_135m",
            "eval.ppl_datasets": ["wikitext2"],
            "eval.max_windows": 16,
            "calibration.split": "validation",
        },
    ),
}


@pytest.fixture(autouse=True)
def hydra_dir():
    import basis_sharing.config  # noqa: F401  (schemas and resolvers)
    import basis_sharing.finetune  # noqa: F401  (the fine-tuners' schemas)
    import basis_sharing.methods  # noqa: F401  (every method's schema)

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield
    GlobalHydra.instance().clear()


def test_every_experiment_file_is_tested_and_the_default_is_last():
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == sorted(EXPECTED)
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    assert defaults[-1] == {"optional experiment": None}
    excluded = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]["job"]["config"]
    assert {"force", "experiment"} <= set(excluded["override_dirname"]["exclude_keys"])
    assert compose("config").get("force") is False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_composes_with_its_sweep(name):
    params, fixed = EXPECTED[name]
    cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == params
    # A fixed sweep directory: re-running the command resumes it.
    assert cfg.hydra.sweep.dir == f"outputs/experiments/{name}"
    for key, value in fixed.items():
        assert OmegaConf.select(cfg, key) == value, key


def jobs(params: dict[str, str]) -> list[list[str]]:
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*values)
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_job_of_the_sweep_composes(name):
    params, _ = EXPECTED[name]
    finetune = params.get("finetune")
    if finetune and not (CONF / "finetune" / f"{finetune}.yaml").exists():
        with pytest.raises(MissingConfigException, match=f"finetune/{finetune}"):
            compose("config", overrides=[f"experiment={name}", f"finetune={finetune}"])
        return  # the sweep fails fast, naming the option; its jobs compose once it exists
    for job in jobs(params):
        cfg = compose("config", overrides=[f"experiment={name}", *job], return_hydra_config=True)
        check_schema(cfg)
        for override in job:
            key, value = override.split("=")
            if key in ("method", "model", "finetune"):
                assert OmegaConf.select(cfg, f"{key}.name") == value
            elif key == "calibration":
                assert cfg.calibration.dataset == value
            else:
                assert str(OmegaConf.select(cfg, key)) == value
        # The job directory is named by the sweep's own overrides, not by experiment=...
        assert job_subdir(cfg.hydra.job.override_dirname) == ",".join(sorted(job))


# Method settings added after the committed records, with the defaults that keep their behaviour.
ADDED_SINCE = {
    "kinds": None,
    "whitening": "cholesky",
    "allocation": "uniform",
    "allocation_scope": "kind",
    "allocation_normalize": False,
    "min_rank": 1,
    "refit_basis": False,
    "refit_samples": None,
    "decomposition": "svd",
    "auto_candidates": "all",
}
# calibration.* settings added since then, at their defaults.
CALIBRATION_ADDED_SINCE = {"forward_dtype": None, "memory_fraction": 0.85, "gram_device": "device"}


def test_table_smollm_reproduces_the_committed_records_settings():
    """Each job's config equals the one recorded in results/runs/smollm2_135m/wikitext2_16w/."""
    store = REPO / "results" / "runs" / "smollm2_135m" / "wikitext2_16w"
    for job in ("method=svd,ratio=0.2", "method=basis_sharing,ratio=0.4"):
        recorded = json.loads((store / job / "results.json").read_text())["config"]
        overrides = ["experiment=table_smollm", *job.split(",")]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        assert job_subdir(cfg.hydra.job.override_dirname) == job
        mine = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
        # Settings added since default to the behaviour the records ran with.
        added = {
            k
            for k, v in mine["method"].items()
            if k not in recorded["method"] and v == ADDED_SINCE.get(k)
        }
        assert added == set(mine["method"]) - set(recorded["method"])
        mine["method"] = {k: v for k, v in mine["method"].items() if k not in added}
        for key, value in CALIBRATION_ADDED_SINCE.items():
            if key not in recorded["calibration"]:
                assert mine["calibration"].pop(key) == value, key
        for key in ("model", "method", "calibration", "ratio", "ratio_tolerance", "seed"):
            assert mine[key] == recorded[key], key
        for key in ("ppl_datasets", "max_windows", "batch_size"):
            assert mine["eval"][key] == recorded["eval"][key], key
        # Evaluation beyond perplexity is off, as it was when the records were made.
        assert mine["eval"]["zeroshot"]["tasks"] == []
        assert mine["eval"]["throughput"]["enabled"] is False


def test_basis_sharing_plus_is_what_its_table_row_selects():
    """conf/method/basis_sharing_plus.yaml and tables.specs.PLUS_OPTIONS cannot drift apart: the
    results store reads the preset's records with exactly the row's filters."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from basis_sharing.tables.specs import PLUS_OPTIONS
    from basis_sharing.tracking.store import record_row

    cfg = compose_config("method=basis_sharing_plus")
    assert cfg.method.name == "basis_sharing"
    config = OmegaConf.to_container(cfg, resolve=True)
    row = record_row({"method": "basis_sharing", "config": config})
    assert {key: row[key] for key in PLUS_OPTIONS} == PLUS_OPTIONS
    assert row["group_size"] == 2


@pytest.mark.parametrize(
    ("method_cfg", "sharing"),
    [
        ({}, "default"),
        ({"shared": ["q", "up"]}, "default"),
        ({"shared": "auto"}, "auto"),  # records from before auto_candidates
        ({"shared": "auto", "auto_candidates": "all"}, "auto"),
        ({"shared": "auto", "auto_candidates": "rule"}, "auto/rule"),
    ],
)
def test_the_store_reads_the_sharing_choice(method_cfg, sharing):
    from basis_sharing.tracking.store import record_row

    config = {"method": {"name": "basis_sharing", **method_cfg}}
    assert record_row({"method": "basis_sharing", "config": config})["sharing"] == sharing
