"""The run as a list of stages built from the config (docs/architecture.md §1.1).

Compressing a model::

    data -> model_source -> tokenize -> load_model -> [throughput_dense] -> [calibrate]
    -> compress -> [finetune] -> [save_model] -> [generate] -> perplexity -> [zeroshot]
    -> [throughput_compressed]

Evaluating a saved model (``load_model=<dir>``)::

    data -> model_source -> tokenize -> load_model -> [generate] -> perplexity -> [zeroshot]
    -> [throughput_model]

A bracketed stage is in the list only when the config asks for it; no stage tests the config
to decide whether it applies. Each stage is one function of the run state, timed (and its peak
memory measured) by ``record.stage``.

Under torchrun the other ranks run only ``worker_stages``: the stages up to the calibration they
share with rank 0 (data, model_source, tokenize, load_model, calibrate), none if it has none.
"""

from __future__ import annotations

from omegaconf import DictConfig

from basis_sharing.stages import calibrate, compress, evaluate, finetune, load, prepare, save
from basis_sharing.stages.state import Plan, RunState, Stage

__all__ = ["Plan", "RunState", "Stage", "build_stages", "run_stages", "worker_stages"]


def build_stages(cfg: DictConfig, plan: Plan) -> list[Stage]:
    """The stages of this run, in order."""
    method, speed = plan.method, cfg.eval.throughput.enabled
    if cfg.load_model is not None:
        stages = [
            Stage("data", prepare.read_data),
            Stage("model_source", load.resolve_saved),
            Stage("tokenize", prepare.tokenize),
            Stage("load_model", load.load_saved, on_device=True),
        ]
    else:
        stages = [
            Stage("data", prepare.read_data, all_ranks=True),
            Stage("model_source", prepare.resolve_model, all_ranks=True),
            Stage("tokenize", prepare.tokenize, all_ranks=True),
            Stage("load_model", prepare.load_base_model, on_device=True, all_ranks=True),
        ]
        if speed and method.compresses:
            stages.append(Stage("throughput_dense", evaluate.throughput("dense"), on_device=True))
        if method.needs_calibration:
            stages.append(Stage("calibrate", calibrate.calibrate, on_device=True, shared=True))
        stages.append(Stage("compress", compress.compress, on_device=True))
        if plan.finetuner is not None:
            stages.append(Stage("finetune", finetune.finetune, on_device=True))
    if cfg.save_model:
        stages.append(Stage("save_model", save.save_model))
    if cfg.eval.generation.prompts:
        stages.append(Stage("generate", evaluate.generate, on_device=True))
    stages.append(Stage("perplexity", evaluate.evaluate_perplexity, on_device=True))
    if cfg.eval.zeroshot.tasks:
        stages.append(Stage("zeroshot", evaluate.evaluate_zeroshot_tasks, on_device=True))
    if speed:
        key = "compressed" if method.compresses else "model"
        stages.append(Stage(f"throughput_{key}", evaluate.throughput(key), on_device=True))
    return stages


def worker_stages(stages: list[Stage]) -> list[Stage]:
    """What a data-parallel rank other than 0 runs of ``stages``.

    The stages every rank runs (``all_ranks``: the setup, and the ``shared`` ones the ranks
    compute together), up to the last shared one; nothing when no stage is shared (method=dense,
    evaluating a saved model): then rank 0 alone does the run.
    """
    last = max((i for i, stage in enumerate(stages) if stage.shared), default=None)
    if last is None:
        return []
    return [stage for stage in stages[: last + 1] if stage.all_ranks or stage.shared]


def run_stages(state: RunState, stages: list[Stage]) -> None:
    """Run each stage in order inside ``record.stage`` (which writes the record after it)."""
    for stage in stages:
        with state.record.stage(stage.name, state.plan.device if stage.on_device else None):
            stage.run(state)
