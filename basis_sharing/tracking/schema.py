"""The layout of ``results.json``, written once: key names, typed sections and a validator.

A run record is one JSON object. Its top-level keys are the ``Key`` names below; the sections
they hold are the ``TypedDict`` classes of this module (``RecordData`` is the whole record). The
writer (``tracking.record``) and every reader (the results store, the W&B logger, the tables,
the end-of-run summary) take the names from here instead of spelling them out, and
``validate_record`` checks a record against the same classes, so the layout has one source.

The classes only describe the JSON: records are plain dicts, written with ``json.dumps`` in the
order the writer inserts keys, so a record is byte-for-byte what earlier versions wrote.
Sections and keys a record of an earlier version (``schema_version`` 1) may lack are optional
(``preflight``, ``environment.threads``, ``calibration``, ...). Inside a section, keys the schema
does not name are allowed (model provenance differs by source, methods add their own details);
at the top level they are not, so a new section is declared here before it is written.

Bump ``SCHEMA_VERSION`` only when the layout changes in a way an older reader would misread.
"""

from __future__ import annotations

import types
from typing import (
    Any,
    Literal,
    TypedDict,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

SCHEMA_VERSION = 1


class Status:
    """Values of ``status``: written at the start, then at the end of a run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


STATUSES = (Status.RUNNING, Status.COMPLETED, Status.FAILED)


class Key:
    """Top-level keys of a record, in the order the writer puts them."""

    SCHEMA_VERSION = "schema_version"
    STATUS = "status"
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"
    RUN_DIR = "run_dir"
    FINGERPRINT = "fingerprint"
    METHOD = "method"
    TARGET_RATIO = "target_ratio"
    SEED = "seed"
    DEVICE = "device"
    OVERRIDES = "overrides"
    CHOICES = "choices"
    CONFIG = "config"
    MODEL = "model"
    DATA = "data"
    HASHES = "hashes"
    PARAMS = "params"
    METRICS = "metrics"
    STAGES = "stages"
    ENVIRONMENT = "environment"
    ERROR = "error"
    # Written by the stages that produce them (absent when the stage does not run).
    PREFLIGHT = "preflight"
    CALIBRATION = "calibration"
    METHOD_INFO = "method_info"
    LOADED_COMPRESSION = "loaded_compression"
    SAVED_MODEL = "saved_model"
    GENERATION_SAMPLES = "generation_samples"
    FINETUNE = "finetune"


class Metric:
    """Keys of the ``metrics`` section."""

    PERPLEXITY = "perplexity"
    ZEROSHOT = "zeroshot"
    THROUGHPUT = "throughput"


# The per-group list of ``method_info`` (``GroupPlan.as_dict`` entries).
GROUPS = "groups"


def dotted(*keys: str) -> str:
    """A dotted path into a record: ``dotted(Key.METRICS, Metric.PERPLEXITY, "c4", "ppl")``."""
    return ".".join(keys)


def ppl_path(dataset: str) -> str:
    """Where a dataset's perplexity lives: ``metrics.perplexity.<dataset>.ppl``."""
    return dotted(Key.METRICS, Metric.PERPLEXITY, dataset, "ppl")


# The results store flattens a record into one row; these prefixes name the columns of
# ``metrics.perplexity.<dataset>`` (``ppl.<dataset>``) and ``metrics.zeroshot.tasks.<task>``
# (``acc.<task>``), which the tables select on.
PPL_COLUMN_PREFIX = "ppl."
ACC_COLUMN_PREFIX = "acc."


# ---------------------------------------------------------------------------------------------
# Sections. A class with ``total=False`` holds optional keys; its base holds the required ones.


class ErrorInfo(TypedDict):
    type: str  # the exception's class name
    message: str


class _ModelRequired(TypedDict):
    name: str


class ModelInfo(_ModelRequired, total=False):
    hf_id: str | None
    revision: str | None
    dtype: str
    context_length: int
    family: str
    source: str
    loaded_from: str


class _HashesRequired(TypedDict):
    eval: dict[str, str]  # sha256 of each evaluation split's token ids
    calibration: str | None  # None: the method needs no calibration


class Hashes(_HashesRequired, total=False):
    throughput: str


class DataProvenance(TypedDict, total=False):
    eval: dict[str, dict[str, Any]]
    calibration: dict[str, Any] | None
    zeroshot: dict[str, dict[str, Any]]
    throughput: dict[str, Any]


class BreakEven(TypedDict):
    module: str
    rank: int
    break_even: float
    d_in: int
    d_out: int


class Budget(TypedDict):
    """The kinds a method's ratio is a fraction of (``method.kinds``, FiPS's MLP) and its counts."""

    kinds: list[str]
    dense: int
    kept: int
    achieved_ratio: float


class Params(TypedDict, total=False):
    total: int
    decoder_projections: int
    dense_decoder_projections: int
    achieved_ratio: float
    planned_decoder_projections: int
    above_break_even: list[BreakEven]
    budget: Budget


class _PerplexityRequired(TypedDict):
    ppl: float  # may be inf or NaN (JSON Infinity/NaN): a diverged model is recorded, not hidden
    n_windows: int
    n_windows_evaluated: int
    truncated: bool


class PerplexityEntry(_PerplexityRequired, total=False):
    dataset: str
    mean_nll: float
    context_length: int
    n_tokens: int
    n_targets: int
    nonfinite_windows: int


class _ZeroshotTaskRequired(TypedDict):
    acc: float | None


class ZeroshotTask(_ZeroshotTaskRequired, total=False):
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    version: float | str | None
    n_samples: int | None
    n_docs: int | None
    data: dict[str, Any]


class _ZeroshotRequired(TypedDict):
    tasks: dict[str, ZeroshotTask]
    mean_acc: float | None
    limit: int | float | None


class Zeroshot(_ZeroshotRequired, total=False):
    num_fewshot: int


class Speed(TypedDict):
    tokens_per_s: float


class _ThroughputEntryRequired(TypedDict):
    forward: Speed
    generation: Speed
    weights_mb: float


class ThroughputEntry(_ThroughputEntryRequired, total=False):
    device: str
    cuda_peak_mb: float


class Speedup(TypedDict):
    forward: float
    generation: float
    weights_mb: float


class Throughput(TypedDict, total=False):
    dense: ThroughputEntry
    compressed: ThroughputEntry
    model: ThroughputEntry  # nothing compressed: the model as loaded
    speedup: Speedup


class Metrics(TypedDict, total=False):
    perplexity: dict[str, PerplexityEntry]
    zeroshot: Zeroshot
    throughput: Throughput


class StageStats(TypedDict, total=False):
    # Empty while the stage runs; filled when it ends, even by an exception.
    wall_s: float
    peak_rss_mb: float
    rss_scope: Literal["stage", "process"]
    cuda_peak_mb: float


class GitState(TypedDict):
    sha: str | None
    dirty: bool | None


class _EnvironmentRequired(TypedDict):
    python: str
    platform: str
    torch_threads: int
    cuda: str | None
    packages: dict[str, str | None]
    git: GitState


class Environment(_EnvironmentRequired, total=False):
    threads: dict[str, Any]  # the thread rule's decision (later than schema_version 1's first runs)


class Preflight(TypedDict, total=False):
    family: str
    layers: int
    max_positions: int | None
    predicted_ratio: float


class StatsEntry(TypedDict):
    stats_key: str
    cache_hit: bool


class CalibrationSummary(TypedDict, total=False):
    gram_dtype: str
    tokens: int
    stats_key: str
    cache_hit: bool
    world_size: int  # processes that calibrated together (torchrun); absent: one
    backend: str  # their torch.distributed backend (gloo, nccl)
    gram: StatsEntry
    scale: StatsEntry
    fisher: StatsEntry
    mlp_inputs: StatsEntry


class GroupEntry(TypedDict):
    kind: str
    index: int
    layers: list[int]
    d_in: int
    d_out: int
    rank: int


class PlannedParams(TypedDict):
    kept: int
    dense: int


class FipsMLPEntry(TypedDict):
    """One MLP's local reconstruction: MSE at the SVD init, after its training, at the end."""

    layer: int
    initial_loss: float  # at the SVD init, before any member of the group is trained
    start_loss: float  # when its own training starts (U moved with the members before it)
    one_shot_pruned_loss: float | None  # the SVD init pruned once to the target (s > 0)
    final_loss: float
    group_final_loss: float
    sparsity: float
    target_sparsity: float
    schedule_sparsity: float
    steps: int


class FipsGroupEntry(TypedDict):
    index: int
    layers: list[int]
    kinds: list[str]
    d: int
    widths: list[int]
    rank: int
    sparsity: float
    basis_key: str
    mlps: list[FipsMLPEntry]
    joint: dict[str, Any] | None  # u_update=joint: steps, losses_before, losses_after


class FipsStorage(TypedDict):
    """Parameters (nonzeros plus U once per group) and bytes (values, bitmasks, U)."""

    params: int
    nonzeros: int
    bytes: int
    index_bytes: int
    dense_params: int
    dense_bytes: int
    params_ratio: float
    bytes_ratio: float


class MethodInfo(TypedDict, total=False):
    group_size: int
    shared_kinds: list[str]
    private_kinds: list[str]
    groups: list[GroupEntry]
    planned_params: PlannedParams
    whitening_fallbacks: int
    private_by_gqa_rule: list[str]
    # FiPS (docs/methods.md §9.7)
    kinds: list[str]
    ratio_of: str
    mlp_ratio: float
    block_groups: list[FipsGroupEntry]
    storage: FipsStorage
    mlp_inputs: dict[str, int]  # tokens and bytes of the cached MLP inputs
    train_seconds: float


class FinetuneSummary(TypedDict, total=False):
    """``finetune``: what the fine-tuner did (docs/methods.md §6.4); a fine-tuner may add keys."""

    name: str
    targets: str | list[str]  # LoRA: the finetune.targets choice or patterns
    adapters: dict[str, Any]  # LoRA: count, by_role, by_kind, shared_bases, modules
    shared_bases: int  # full: shared bases trained, each as one tensor
    adapter_dir: str  # LoRA with save_adapter: the adapter in PEFT's format
    data: dict[str, dict[str, Any]]  # train / eval: dataset, split, source, blocks, block_len
    precision: Literal["bf16", "fp32"]
    trainable_params: int
    params_before: int
    params_after: int
    epochs: int
    steps: list[int]  # the global optimizer step of each train_loss
    train_loss: list[float]  # per optimizer step
    eval_loss: list[float]  # per epoch
    best_epoch: int | None  # 1-based; the weights kept
    tokens_seen: int
    resumed_from_epoch: int | None  # a resumed run: the epochs its checkpoint had done
    train_wall_s: float
    wall_s: float
    peak_rss_mb: float  # the process's peak
    cuda_peak_mb: float


class GenerationSample(TypedDict):
    prompt: str
    completion: str
    new_token_ids: list[int]


class _RecordRequired(TypedDict):
    # The keys every record has, from its first write on.

    schema_version: int
    status: Literal["running", "completed", "failed"]
    started_at: str
    finished_at: str | None
    run_dir: str
    method: str
    target_ratio: float | None  # None: the method does not compress
    seed: int
    device: str
    overrides: list[str]
    choices: dict[str, str | None]
    config: dict[str, Any]
    model: ModelInfo
    hashes: Hashes
    params: Params
    metrics: Metrics
    stages: dict[str, StageStats]
    error: ErrorInfo | None


class RecordData(_RecordRequired, total=False):
    """A whole record; the optional keys came later or belong to stages a run may skip."""

    fingerprint: str
    data: DataProvenance  # hand-written store fixtures and the first records have none
    environment: Environment
    preflight: Preflight
    calibration: CalibrationSummary
    method_info: MethodInfo | None
    loaded_compression: dict[str, Any]
    saved_model: str
    generation_samples: list[GenerationSample]
    finetune: FinetuneSummary  # what the fine-tuner reports (finetune stage)


TOP_LEVEL_KEYS = tuple(get_type_hints(RecordData))


# ---------------------------------------------------------------------------------------------
# Accessors for readers: a missing or null section reads as empty.


def section(record: dict[str, Any], key: str) -> dict[str, Any]:
    """The section ``key`` of ``record`` (``{}`` when it is missing, null or not an object)."""
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def metric(record: dict[str, Any], name: str) -> dict[str, Any]:
    """``metrics.<name>`` (``{}`` when the run did not measure it)."""
    value = section(record, Key.METRICS).get(name)
    return value if isinstance(value, dict) else {}


def perplexity(record: dict[str, Any]) -> dict[str, PerplexityEntry]:
    """``metrics.perplexity``: one entry per dataset."""
    return metric(record, Metric.PERPLEXITY)  # type: ignore[return-value]


def zeroshot(record: dict[str, Any]) -> Zeroshot:
    """``metrics.zeroshot`` (``{}`` when no task ran)."""
    return metric(record, Metric.ZEROSHOT)  # type: ignore[return-value]


def throughput(record: dict[str, Any]) -> Throughput:
    """``metrics.throughput`` (``{}`` when speed was not measured)."""
    return metric(record, Metric.THROUGHPUT)  # type: ignore[return-value]


def groups(record: dict[str, Any]) -> list[GroupEntry]:
    """``method_info.groups``: the factorisations, empty for a method that has none."""
    return section(record, Key.METHOD_INFO).get(GROUPS) or []


def is_completed(record: dict[str, Any]) -> bool:
    return record.get(Key.STATUS) == Status.COMPLETED


def error_info(exc: BaseException) -> ErrorInfo:
    """The ``error`` section of a failed run."""
    return {"type": type(exc).__name__, "message": str(exc)}


# ---------------------------------------------------------------------------------------------
# Validation.

_JSON_KINDS = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"))


def _kind(value: Any) -> str:
    """The JSON kind of a parsed value (bool before int: a bool is an int in Python)."""
    for cls, name in _JSON_KINDS:
        if isinstance(value, cls):
            return name
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _expected(tp: Any) -> str:
    """A type annotation in JSON words (``float | None`` -> "number or null")."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if tp is dict or origin is dict or is_typeddict(tp):
        return "object"
    if tp is list or origin is list:
        return "array"
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _scalar_ok(value: Any, tp: Any) -> bool:
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # JSON has one number type: 2 and 2.0 are both numbers
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"schema type {tp!r} is not a JSON type")


def _check(value: Any, tp: Any, path: str, problems: list[str]) -> None:
    """Append to ``problems`` where ``value`` does not match the annotation ``tp``."""
    if tp is Any:
        return
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        for option in options:
            found: list[str] = []
            _check(value, option, path, found)
            if not found:
                return
        structured = [o for o in options if o is not type(None)]
        if value is not None and len(structured) == 1 and _kind(value) == _expected(structured[0]):
            _check(value, structured[0], path, problems)  # right kind: say what inside is wrong
        else:
            problems.append(f"{path}: expected {_expected(tp)}, got {_kind(value)}")
        return
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{path}: {value!r} is not {_expected(tp)}")
        return
    if is_typeddict(tp):
        _check_object(value, tp, path, problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected object, got {_kind(value)}")
            return
        for key, item in value.items():
            _check(item, get_args(tp)[1], f"{path}.{key}", problems)
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected array, got {_kind(value)}")
            return
        for i, item in enumerate(value):
            _check(item, get_args(tp)[0], f"{path}[{i}]", problems)
    elif not _scalar_ok(value, tp):
        problems.append(f"{path}: expected {_expected(tp)}, got {_kind(value)}")


def _check_object(value: Any, cls: type, path: str, problems: list[str]) -> None:
    """The keys of one section: required ones present, every named one of its type."""
    if not isinstance(value, dict):
        problems.append(f"{path or 'the record'}: expected object, got {_kind(value)}")
        return
    prefix = f"{path}." if path else ""
    for key, tp in get_type_hints(cls).items():
        if key in value:
            _check(value[key], tp, prefix + key, problems)
        elif key in cls.__required_keys__:
            problems.append(f"{prefix}{key}: missing")


def _status_problems(data: dict[str, Any]) -> list[str]:
    """What each status implies about the rest of the record."""
    status, error = data.get(Key.STATUS), data.get(Key.ERROR)
    problems = []
    if status == Status.RUNNING and error is not None:
        problems.append("error: a running record has an error")
    if status == Status.COMPLETED:
        if data.get(Key.FINISHED_AT) is None:
            problems.append("finished_at: a completed record has no finish time")
        if error is not None:
            problems.append("error: a completed record has an error")
        params = section(data, Key.PARAMS)
        for key in ("total", "achieved_ratio"):  # every completed run counts its parameters
            if key not in params:
                problems.append(f"params.{key}: missing in a completed record")
        for name, stats in section(data, Key.STAGES).items():
            if isinstance(stats, dict) and "wall_s" not in stats:
                problems.append(f"stages.{name}.wall_s: missing in a completed record")
    if status == Status.FAILED:
        if data.get(Key.FINISHED_AT) is None:
            problems.append("finished_at: a failed record has no finish time")
        if error is None:
            problems.append("error: a failed record has no error type and message")
    return problems


def validate_record(data: Any) -> list[str]:
    """Problems of a parsed ``results.json`` against this schema (empty when it is valid).

    Each problem is ``"<dotted path>: <what is wrong>"``.
    """
    if not isinstance(data, dict):
        return [f"the record: expected object, got {_kind(data)}"]
    problems: list[str] = []
    _check_object(data, RecordData, "", problems)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{key}: not a key of the record schema (declare it in schema.py)")
    version = data.get(Key.SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        problems.append(f"schema_version: {version} is newer than this code's {SCHEMA_VERSION}")
    return problems + _status_problems(data)
