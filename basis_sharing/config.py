"""Structured-config schemas for every Hydra config group.

The schemas are registered in Hydra's ConfigStore so that a typo'd key or a wrongly typed value
fails when the config is composed, before any model or data is touched. Groups whose options carry
different fields (method, finetune, logger) get one schema per option under ``schema/<group>/``;
each option's YAML lists it first in its defaults. An option's schema may be declared by the module
that implements it (``register_option_schema``): every method's is, in its file under
``basis_sharing/methods/``, so whatever composes a config imports ``basis_sharing.methods`` first.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from basis_sharing.errors import ConfigError

TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class ModelConfig:
    """Where a model comes from and the paper-protocol settings that belong to it.

    Exactly one source is used, first match wins: ``local_path`` (a directory written by
    ``save_pretrained``), ``gguf_package`` (a GGUF file shipped inside an installed Python package),
    else ``hf_id`` on the Hugging Face hub (``revision`` pins a branch, tag or commit).
    """

    name: str = MISSING
    family: str | None = None  # llama / mistral / opt / gpt2; None = read model_type
    hf_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    context_length: int = 2048
    calib_batch_size: int = 16
    eval_batch_size: int = 1


@dataclass
class CalibrationConfig:
    """Which text the calibration statistics are computed on (docs/methods.md §2.1)."""

    dataset: str | None = None  # None: no calibration set configured
    split: str = "train"
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 2023
    gram_dtype: str = "float32"  # accumulation dtype of X^T X: float32 (paper) or float64


# The paper's seven zero-shot tasks (lm-eval names), in its Table 1 column order: the one list
# evaluation.zeroshot (the tasks' data) and tables.specs (the column labels) are built from.
PAPER_ZEROSHOT_TASKS = (
    "openbookqa",
    "arc_easy",
    "winogrande",
    "hellaswag",
    "arc_challenge",
    "piqa",
    "mathqa",
)


@dataclass
class ZeroShotConfig:
    """lm-eval zero-shot reasoning (docs/methods.md §7.2); an empty task list skips it."""

    tasks: list[str] = field(default_factory=lambda: list(PAPER_ZEROSHOT_TASKS))
    limit: float | None = None  # docs per task (int) or a fraction; None: every doc
    batch_size: int = 32  # set on HFLM (simple_evaluate ignores it for an in-memory model)
    max_length: int | None = None  # None: model.context_length


@dataclass
class ThroughputConfig:
    """Forward and generation speed, dense and compressed in one run (docs/methods.md §7.3-§7.4)."""

    enabled: bool = False
    seq_len: int = 32
    fraction: float = 0.25  # first quarter of the WikiText-2 validation blocks
    batch_size: int | None = None  # None: 512 on a GPU, 16 on a CPU
    warmup: int = 10
    max_batches: int | None = None  # None: every full batch of the blocks
    compile: bool = False  # torch.compile the model first (the paper does, on a GPU)
    prompt_tokens: int = 4  # generation: prompt length (SVD-LLM's protocol)
    new_tokens: int = 128
    runs: int = 3


@dataclass
class GenerationConfig:
    """Greedy samples stored in results.json after compression; an empty list skips them."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32


@dataclass
class EvalConfig:
    """Evaluation protocol (docs/methods.md §7)."""

    ppl_datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    max_windows: int | None = None  # None: every window, i.e. the full paper protocol
    batch_size: int | None = None  # None: model.eval_batch_size
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class PathsConfig:
    data_dir: str = "data"  # local data mirror (make data MIRROR=...)
    cache_dir: str = "~/.cache/basis-sharing"  # converted models, statistics
    output_root: str = "outputs"  # Hydra run and sweep directories


@dataclass
class FinetuneConfig:
    name: str = MISSING


@dataclass
class NoFinetuneConfig(FinetuneConfig):
    pass


@dataclass
class LoggerConfig:
    name: str = MISSING


@dataclass
class NoLoggerConfig(LoggerConfig):
    pass


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbLoggerConfig(LoggerConfig):
    """Weights & Biases: one W&B run per job, mirroring results.json as it is written.

    ``mode`` defaults to offline so that a run without an account or network still leaves a
    complete run on disk, uploaded later with ``wandb sync <dir>``.
    """

    mode: str = "offline"  # online / offline / disabled
    project: str = "basis-sharing"
    entity: str | None = None  # None: the account's default entity
    group: str | None = None  # None: the model name (the YAML prefers an experiment_name key)
    dir: str | None = None  # where W&B writes its files; None: the job's output directory
    tags: list[str] = field(default_factory=list)  # extra tags, after the ones from the choices


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING
    calibration: CalibrationConfig = MISSING
    finetune: Any = MISSING
    eval: EvalConfig = MISSING
    logger: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    ratio: float = 0.2  # target compression ratio of the decoder projections, in (0, 1)
    ratio_tolerance: float = 0.005  # a run fails when the achieved ratio misses ratio by more
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int | None = None  # CPU threads; None = the CPUs this process is allowed
    offline: bool = False  # never contact the hub, even when a file is missing locally
    save_model: bool = False  # save the compressed model to <run dir>/compressed_model
    save_model_overwrite: bool = False  # let save_model replace a model saved there earlier
    load_model: str | None = None  # evaluate a saved compressed model (with method=none)
    force: bool = False  # recompute even when the job's output dir holds a completed run of it
    experiment_name: str | None = None  # set by conf/experiment/*.yaml; the W&B group


# Schemas of the options of groups whose options differ. The method group's are registered by
# the method files (basis_sharing/methods/, through register_method) when they are imported.
OPTION_SCHEMAS: dict[str, dict[str, type]] = {
    "method": {},
    "finetune": {"none": NoFinetuneConfig},
    "logger": {"none": NoLoggerConfig, "wandb": WandbLoggerConfig},
}


_REGISTERED = False  # set once register_configs has filled the ConfigStore


def register_option_schema(group: str, option: str, schema: type) -> None:
    """Declare the schema of one option of a group whose options differ (method, runtime, ...).

    The module that implements the option calls this when it is imported (a method file does so
    through ``register_method``), so the schema is written once, next to the code that reads it,
    and this module never imports upwards. ``register_configs`` puts it in Hydra's ConfigStore.
    """
    options = OPTION_SCHEMAS.setdefault(group, {})
    if options.get(option, schema) is not schema:
        raise ValueError(f"schema for {group}={option} registered twice")
    options[option] = schema
    if _REGISTERED:
        ConfigStore.instance().store(group=f"schema/{group}", name=option, node=schema)


def check_schema(cfg: DictConfig) -> None:
    """Re-check a composed config against the schemas.

    Hydra's ``+key=value`` appends bypass the structured-config check, so a typo such as
    ``+eval.max_windowz=3`` would otherwise be silently ignored.
    """
    # Plain containers: a composed node keeps its schema but not the struct flag on appended keys.
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    try:
        OmegaConf.merge(OmegaConf.structured(Config), plain)
        for group, options in OPTION_SCHEMAS.items():
            node = plain[group]
            if node.get("name") in options:
                OmegaConf.merge(OmegaConf.structured(options[node["name"]]), node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"Invalid configuration: {exc}") from None


MAX_SUBDIR = 120


def job_subdir(override_dirname: str) -> str:
    """A sweep job's directory name: its overrides, made safe for any filesystem.

    "/" would nest directories and names over 255 bytes are refused by most filesystems, so long
    names keep their start and end a short hash of the whole (the full overrides are recorded in
    results.json and .hydra/overrides.yaml anyway).
    """
    name = override_dirname.replace("/", "_") or "default"
    if len(name) <= MAX_SUBDIR:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_SUBDIR - 11]}~{digest}"


def run_token() -> str:
    """A random 6-hex-digit token that tells apart runs started in the same second.

    Hydra's directory names have one-second resolution, so two runs (or two sweeps, or two SLURM
    arrays) started together would share one directory and overwrite each other's record. The
    resolver is cached like Hydra's ``now``, and Hydra copies that cache into every job of a
    sweep, so all jobs of one launch agree on the token.
    """
    return secrets.token_hex(3)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    _REGISTERED = True
    if not OmegaConf.has_resolver("bs_subdir"):
        OmegaConf.register_new_resolver("bs_subdir", job_subdir)
    if not OmegaConf.has_resolver("bs_run_token"):
        OmegaConf.register_new_resolver("bs_run_token", run_token, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, options in OPTION_SCHEMAS.items():
        for option, node in options.items():
            cs.store(group=f"schema/{group}", name=option, node=node)


register_configs()
