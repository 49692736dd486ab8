"""Checks that run before any work, from the config alone (and the paths it names).

``validate`` resolves the run's plan (method, fine-tuner, device) or refuses the config with a
message that says what to change. Each group's ranges are checked by its schema
(``config.check_config``), each method's settings by the method (``check_config``); what is left
here are the names that registries in higher layers own (datasets, families, the saved model,
calibration sets) and what needs two groups at once. What the model's shapes decide is checked
later, by the model_source stage, before the weights are read (``stages/checks.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from basis_sharing.calibration.statistics import check_data_parallel, get_statistic
from basis_sharing.config import check_config, is_auto_batch
from basis_sharing.data.corpora import get_corpus_spec, split_source
from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.evaluation.perplexity import PPL_SPLITS
from basis_sharing.finetune.registry import get_finetuner
from basis_sharing.methods import get_method
from basis_sharing.methods.registry import METHODS, CompressionMethod
from basis_sharing.models.compressed_io import read_manifest, require_tokenizer
from basis_sharing.models.families import get_family
from basis_sharing.models.loading import check_model_dir
from basis_sharing.runtime import check_runtime, distributed
from basis_sharing.stages.state import Plan


def validate(cfg: DictConfig) -> Plan:
    """Check every setting that can be checked without data or weights."""
    check_config(cfg)
    method = get_method(cfg.method)
    family = get_family(cfg.model.family) if cfg.model.family else None
    method.check_config(family)
    check_runtime(cfg.runtime, method, sequential_methods())
    for name in cfg.eval.ppl_datasets:
        if name not in PPL_SPLITS:
            raise unknown_choice("perplexity dataset (eval.ppl_datasets)", name, list(PPL_SPLITS))
    if cfg.load_model is not None:
        check_saved_model(cfg, method)
    elif cfg.model.local_path:
        check_model_dir(Path(cfg.model.local_path).expanduser(), "model.local_path")
    if method.needs_calibration:
        check_calibration_source(cfg)
    check_data_parallel_launch(cfg, method)
    finetuner = get_finetuner(cfg.finetune, cfg)
    device = resolve_device(cfg.device)
    check_sequential_evaluation(cfg, device)
    return Plan(method=method, device=device, finetuner=finetuner)


def check_data_parallel_launch(cfg: DictConfig, method: CompressionMethod) -> None:
    """Under torchrun: the method's statistics reduce across ranks, each rank gets a batch.

    Raises:
        ConfigError: a statistic that cannot run data-parallel, or fewer calibration batches
            (calibration.n_samples / model.calib_batch_size) than processes.
    """
    size = distributed.launch_size()
    if size == 1 or not method.needs_calibration or cfg.load_model is not None:
        return
    world = distributed.World(size=size)
    check_data_parallel([get_statistic(name) for name in method.stats_needed], world)
    batch = cfg.model.calib_batch_size
    # auto is capped at one rank's share of the samples, so only batch 1 needs checking then
    distributed.shard_bounds(cfg.calibration.n_samples, size, 1 if is_auto_batch(batch) else batch)


def sequential_methods() -> list[str]:
    """The compressing methods that run block by block (suggested when one cannot)."""
    return [n for n, c in METHODS.items() if c.supports_sequential and c.compresses]


def check_sequential_evaluation(cfg: DictConfig, device: torch.device) -> None:
    """runtime=sequential on an accelerator: only stages that run block by block.

    Calibration, compression, the updates and perplexity run one decoder block at a time; the
    generation samples, lm-eval's zero-shot tasks and the throughput measurement run the whole
    model, whose weights runtime=sequential keeps on the CPU. On the CPU that is the device, so
    they run as usual.
    """
    if cfg.runtime.name != "sequential" or device.type == "cpu":
        return
    whole = [
        key
        for key, asked in (
            ("eval.generation.prompts", bool(cfg.eval.generation.prompts)),
            ("eval.zeroshot.tasks", bool(cfg.eval.zeroshot.tasks)),
            ("eval.throughput.enabled", bool(cfg.eval.throughput.enabled)),
        )
        if asked
    ]
    if whole:
        raise ConfigError(
            f"runtime=sequential on {device} runs calibration, compression and perplexity one "
            f"decoder block at a time, but {', '.join(whole)} need(s) the whole model on the "
            "device, and runtime=sequential keeps the weights on the CPU. Use eval=ppl (or clear "
            "those settings) with runtime=sequential, or runtime=full."
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was requested but CUDA is not available here.")
    return device


def check_saved_model(cfg: DictConfig, method: CompressionMethod) -> None:
    """``load_model``: method=none, a complete saved model, compressed from this ``model``."""
    if method.compresses:
        raise ConfigError(
            f"load_model={cfg.load_model} evaluates a saved compressed model; use method=none "
            f"(not method={cfg.method.name})."
        )
    manifest, _ = read_manifest(Path(cfg.load_model).expanduser())
    require_tokenizer(Path(cfg.load_model).expanduser(), manifest)
    saved_from = manifest.get("info", {}).get("model_name")
    if saved_from is not None and saved_from != cfg.model.name:
        raise ConfigError(
            f"load_model={cfg.load_model} was compressed from model={saved_from}; pass "
            f"model={saved_from} so the evaluation uses that model's settings."
        )


def check_calibration_source(cfg: DictConfig) -> None:
    """A method that calibrates: a calibration set that exists and fits the context."""
    calib = cfg.calibration
    if calib.dataset is None:
        raise ConfigError(
            f"method {cfg.method.name} needs calibration data but calibration=none; "
            "choose e.g. calibration=wikitext2."
        )
    context_length = cfg.model.context_length
    if calib.seq_len > context_length:
        raise ConfigError(
            f"calibration.seq_len={calib.seq_len} is longer than model.context_length="
            f"{context_length}. Use calibration.seq_len<={context_length}, or raise "
            "model.context_length if the model supports more positions."
        )
    get_corpus_spec(calib.dataset)
    split_source(calib.dataset, calib.split)
