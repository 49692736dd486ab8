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

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.threads import check_threads

TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")
GRAM_DTYPES = ("float32", "float64")  # accumulation dtypes of the calibration Grams
# calibration.forward_dtype below the model's: the pass runs under torch.autocast in it.
AUTOCAST_DTYPES = ("bfloat16", "float16")
AUTO_BATCH = "auto"  # model.calib_batch_size: the largest batch the device's free memory holds
GRAM_DEVICES = ("device", "cpu")  # calibration.gram_device: where the Gram accumulators live


@dataclass
class ModelConfig:
    """Where a model comes from and the paper-protocol settings that belong to it.

    Exactly one source is used, first match wins: ``local_path`` (a directory written by
    ``save_pretrained``), ``gguf_package`` (a GGUF file shipped inside an installed Python package),
    else ``hf_id`` on the Hugging Face hub (``revision`` pins a branch, tag or commit).
    The defaults below are written only here: a ``conf/model/*.yaml`` lists what differs.
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
    calib_batch_size: Any = 16  # an integer >= 1, or auto (calibration/batching.py)
    eval_batch_size: int = 1

    @staticmethod
    def check(node: DictConfig) -> None:
        if node.dtype not in TORCH_DTYPES:
            raise unknown_choice("model.dtype", node.dtype, list(TORCH_DTYPES))
        if node.context_length < 2:
            raise ConfigError(f"model.context_length={node.context_length} must be >= 2.")
        _at_least(1, {"model.eval_batch_size": node.eval_batch_size})
        check_batch_setting(node.calib_batch_size)


@dataclass
class CalibrationConfig:
    """Which text the calibration statistics are computed on (docs/methods.md §2.1).

    The paper's setting is the default (256 blocks of 2048 tokens, seed 2023); a
    ``conf/calibration/*.yaml`` names its dataset and lists only what differs.
    """

    dataset: str | None = None  # None: no calibration set configured
    split: str = "train"
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 2023
    gram_dtype: str = "float32"  # accumulation dtype of X^T X: float32 (paper) or float64
    # dtype of the calibration forward pass: None (the model's, as the paper) or bfloat16 /
    # float16 (torch.autocast: matmuls in that dtype, the Grams still accumulated in gram_dtype).
    forward_dtype: str | None = None
    # model.calib_batch_size=auto: the share of the device's free memory the pass may fill.
    memory_fraction: float = 0.85
    # Where the Gram accumulators live during a runtime=full pass: on the device (the fastest),
    # or on the CPU, each batch's X^T X computed on the device and added there (the device then
    # holds no layer's Grams: 22 GB for LLaMA-7B in float32). runtime=sequential moves each
    # block's Grams to the CPU when the block is done either way.
    gram_device: str = "device"

    @staticmethod
    def check(node: DictConfig) -> None:
        forward = node.get("forward_dtype")
        if forward is not None and forward not in TORCH_DTYPES:
            raise unknown_choice("calibration.forward_dtype", forward, ["null", *TORCH_DTYPES])
        if node.gram_dtype not in GRAM_DTYPES:
            raise ConfigError(
                f"calibration.gram_dtype={node.gram_dtype!r}: use float32 (the paper) or float64."
            )
        if node.n_samples < 1:
            raise ConfigError(f"calibration.n_samples={node.n_samples} must be >= 1.")
        if not 0.0 < float(node.memory_fraction) <= 1.0:
            raise ConfigError(
                f"calibration.memory_fraction={node.memory_fraction} must be in (0, 1]."
            )
        if node.gram_device not in GRAM_DEVICES:
            raise unknown_choice("calibration.gram_device", node.gram_device, GRAM_DEVICES)
        if node.seq_len < 2:
            raise ConfigError(f"calibration.seq_len={node.seq_len} must be >= 2 tokens.")


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

    @staticmethod
    def check(node: DictConfig) -> None:
        for name in node.tasks:
            if name not in PAPER_ZEROSHOT_TASKS:
                raise unknown_choice(
                    "zero-shot task (eval.zeroshot.tasks)", name, list(PAPER_ZEROSHOT_TASKS)
                )
        limit = node.limit
        if limit is not None and (limit <= 0 or (limit > 1 and limit != int(limit))):
            raise ConfigError(
                f"eval.zeroshot.limit={limit}: use a document count >= 1, a fraction in (0, 1], "
                "or null for every document."
            )
        _at_least(
            1,
            {
                "eval.zeroshot.batch_size": node.batch_size,
                "eval.zeroshot.max_length": node.max_length,
            },
        )


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

    @staticmethod
    def check(node: DictConfig) -> None:
        keys = ("seq_len", "batch_size", "max_batches", "prompt_tokens", "new_tokens", "runs")
        _at_least(1, {f"eval.throughput.{k}": node[k] for k in keys})
        _at_least(0, {"eval.throughput.warmup": node.warmup})
        if not 0.0 < node.fraction <= 1.0:
            raise ConfigError(f"eval.throughput.fraction={node.fraction} must be in (0, 1].")


@dataclass
class GenerationConfig:
    """Greedy samples stored in results.json after compression; an empty list skips them."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32

    @staticmethod
    def check(node: DictConfig) -> None:
        _at_least(1, {"eval.generation.max_new_tokens": node.max_new_tokens})


@dataclass
class EvalConfig:
    """Evaluation protocol (docs/methods.md §7)."""

    ppl_datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    max_windows: int | None = None  # None: every window, i.e. the full paper protocol
    # Per dataset, a window limit replacing max_windows (e.g. eval.dataset_windows.ptb=4);
    # null: max_windows applies.
    dataset_windows: dict[str, int | None] = field(
        default_factory=lambda: {"wikitext2": None, "ptb": None, "c4": None}
    )
    batch_size: int | None = None  # None: model.eval_batch_size
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    @staticmethod
    def check(node: DictConfig) -> None:
        # Dataset names are checked against the evaluation's registry (preflight.validate).
        if node.max_windows is not None and node.max_windows < 1:
            raise ConfigError(f"eval.max_windows={node.max_windows} must be >= 1 or null.")
        for name, windows in node.dataset_windows.items():
            if windows is not None and name not in node.ppl_datasets:
                raise ConfigError(
                    f"eval.dataset_windows names {name!r}, which is not in eval.ppl_datasets "
                    f"{list(node.ppl_datasets)}."
                )
            _at_least(1, {f"eval.dataset_windows.{name}": windows})
        _at_least(1, {"eval.batch_size": node.batch_size})
        ZeroShotConfig.check(node.zeroshot)
        ThroughputConfig.check(node.throughput)
        GenerationConfig.check(node.generation)


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
    runtime: Any = MISSING
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

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """The run's own ranges, then each group's (an option schema's ``check``, if it has one)."""
        check_threads(cfg.threads)
        if not 0.0 < cfg.ratio < 1.0:
            raise ConfigError(
                f"ratio={cfg.ratio} is outside (0, 1): it is the fraction of decoder-projection "
                "weights removed, e.g. ratio=0.2 keeps 80%."
            )
        if cfg.ratio_tolerance < 0:
            raise ConfigError(f"ratio_tolerance={cfg.ratio_tolerance} must be >= 0.")
        ModelConfig.check(cfg.model)
        CalibrationConfig.check(cfg.calibration)
        forward_dtype(cfg)  # the calibration pass's dtype against the model's
        EvalConfig.check(cfg.eval)
        for group, options in OPTION_SCHEMAS.items():
            schema = options.get(cfg[group].name)
            if hasattr(schema, "check"):
                schema.check(cfg[group])


def forward_dtype(cfg: DictConfig) -> str | None:
    """The autocast dtype of the calibration pass, or None when it runs in the model's dtype.

    Raises:
        ConfigError: a forward dtype above the model's (autocast only lowers precision).
    """
    forward, model = cfg.calibration.get("forward_dtype"), cfg.model.dtype
    if forward is None or forward == model:
        return None
    if forward not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"calibration.forward_dtype={forward} with model.dtype={model}: the pass can only run "
            f"below the model's dtype ({', '.join(AUTOCAST_DTYPES)}); load the model in "
            f"{forward} instead (model.dtype={forward})."
        )
    return forward


def is_auto_batch(value: Any) -> bool:
    """``model.calib_batch_size`` asks for the batch size to be chosen (``auto``)."""
    return isinstance(value, str) and value.strip().lower() == AUTO_BATCH


def check_batch_setting(value: Any) -> None:
    """``model.calib_batch_size``: an integer >= 1 or ``auto``."""
    if is_auto_batch(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"model.calib_batch_size={value!r} must be an integer >= 1 or 'auto' (the largest "
            "batch the device's free memory holds)."
        )


def _at_least(low: int, values: dict[str, Any]) -> None:
    """Refuse any of ``values`` (dotted key -> value; None means unset) below ``low``."""
    for key, value in values.items():
        if value is not None and value < low:
            raise ConfigError(f"{key}={value} must be >= {low}.")


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


def check_config(cfg: DictConfig) -> None:
    """The composed config against the schemas, then every group's range checks."""
    check_schema(cfg)
    Config.check(cfg)


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
