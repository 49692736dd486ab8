"""The run as a list of stages: which stages a config puts in the list, and the finetune slot."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import compose_config, tiny_run_overrides
from omegaconf import OmegaConf

import basis_sharing.methods  # noqa: F401  (registers every method)
from basis_sharing import config, pipeline
from basis_sharing.errors import ConfigError
from basis_sharing.finetune import registry as finetune_registry
from basis_sharing.finetune.registry import FinetuneContext, Finetuner
from basis_sharing.methods import get_method
from basis_sharing.models.compressed_io import load_compressed
from basis_sharing.models.loading import ModelSource, load_model
from basis_sharing.modules import CompressedLinear
from basis_sharing.stages import Plan, build_stages, evaluate, load, prepare
from basis_sharing.tracking.schema import validate_record

CPU = torch.device("cpu")
HEAD = ["data", "model_source", "tokenize", "load_model"]


def names(cfg, finetuner=None) -> list[str]:
    plan = Plan(get_method(cfg.method), CPU, finetuner)
    return [s.name for s in build_stages(cfg, plan)]


def test_the_default_compressing_run():
    cfg = compose_config("eval=ppl")
    assert names(cfg) == [*HEAD, "calibrate", "compress", "perplexity"]


def test_optional_stages_are_in_the_list_only_when_asked_for():
    cfg = compose_config(
        "method=svd",
        "eval=paper",
        "eval.throughput.enabled=true",
        "save_model=true",
        "eval.generation.prompts=[hello]",
    )
    assert names(cfg) == [
        *HEAD,
        "throughput_dense",
        "compress",  # plain SVD needs no calibration
        "save_model",
        "generate",
        "perplexity",
        "zeroshot",
        "throughput_compressed",
    ]
    dense = compose_config("method=dense", "eval=ppl", "eval.throughput.enabled=true")
    assert names(dense) == [*HEAD, "compress", "perplexity", "throughput_model"]


def test_a_saved_model_is_evaluated_by_its_own_stage_list():
    cfg = compose_config("method=none", "eval=ppl", "load_model=/somewhere")
    plan = Plan(get_method(cfg.method), CPU)
    stages = build_stages(cfg, plan)
    assert [s.name for s in stages] == [*HEAD, "perplexity"]
    assert [s.run for s in stages[1:4:2]] == [load.resolve_saved, load.load_saved]
    assert stages[0].run is prepare.read_data and stages[-1].run is evaluate.evaluate_perplexity


def test_finetune_none_has_no_stage_and_a_finetuner_has_its_slot():
    cfg = compose_config("eval=ppl", "save_model=true")
    assert "finetune" not in names(cfg)
    with_finetuner = names(cfg, finetuner=object())
    assert with_finetuner == [
        *HEAD,
        "calibrate",
        "compress",
        "finetune",
        "save_model",
        "perplexity",
    ]


def test_an_unknown_finetuner_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"Unknown fine-tuner \(finetune\) 'qlora'.*none"):
        finetune_registry.get_finetuner(OmegaConf.create({"name": "qlora"}))


@dataclass
class ScaleNormConfig(config.FinetuneConfig):
    factor: float = 2.0


class ScaleNorm(Finetuner):
    """A stand-in fine-tuner: scales the final norm, and reports what it was handed."""

    def finetune(self, model, family, ctx: FinetuneContext) -> dict:
        with torch.no_grad():
            model.model.norm.weight.mul_(self.cfg.factor)
        compressed = sum(isinstance(m, CompressedLinear) for m in model.modules())
        return {"factor": self.cfg.factor, "compressed_modules_seen": compressed}


@pytest.fixture
def scale_norm(monkeypatch):
    """ScaleNorm registered as finetune=scale_norm for one test (the registries restored after)."""
    monkeypatch.setattr(finetune_registry, "FINETUNERS", dict(finetune_registry.FINETUNERS))
    monkeypatch.setitem(config.OPTION_SCHEMAS, "finetune", dict(config.OPTION_SCHEMAS["finetune"]))
    finetune_registry.register_finetuner("scale_norm", schema=ScaleNormConfig)(ScaleNorm)


def test_a_registered_finetuner_trains_the_compressed_model_before_it_is_saved(
    scale_norm, tiny_model_dir, tiny_mirror, tmp_path
):
    cfg = compose_config(
        *tiny_run_overrides(
            tiny_model_dir,
            tiny_mirror,
            f"paths.cache_dir={tmp_path}/cache",
            "eval.ppl_datasets=[wikitext2]",
            "method=svd",
            "ratio=0.3",
            "ratio_tolerance=0.05",
            "save_model=true",
        )
    )
    cfg.finetune = OmegaConf.create({"name": "scale_norm", "factor": 3.0})
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert list(record["stages"]) == [
        *HEAD,
        "compress",
        "finetune",
        "save_model",
        "perplexity",
    ]
    compressed = len(record["method_info"]["groups"])
    assert record["finetune"] == {"factor": 3.0, "compressed_modules_seen": compressed}
    assert compressed > 0 and validate_record(record) == []
    dense, _ = load_model(cfg.model, ModelSource(tiny_model_dir), CPU)
    saved = load_compressed(tmp_path / "run" / "compressed_model").model
    assert torch.equal(saved.model.norm.weight, dense.model.norm.weight * 3.0)


def test_a_finetuner_setting_outside_its_schema_is_refused(scale_norm, tiny_model_dir, tiny_mirror):
    cfg = compose_config(*tiny_run_overrides(tiny_model_dir, tiny_mirror))
    cfg.finetune = OmegaConf.create({"name": "scale_norm", "factr": 3.0})
    with pytest.raises(ConfigError, match="factr"):
        pipeline.validate(cfg)
