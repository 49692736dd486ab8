"""Zero-shot reasoning through lm-evaluation-harness, on the model this run produced.

The in-memory model (dense or compressed) is wrapped in lm-eval's ``HFLM``; batch size, device and
maximum length are set on ``HFLM`` because ``simple_evaluate`` ignores them for an ``LM`` object.

Prompts, choices and targets are always lm-eval's own: each task is lm-eval's standard YAML. When
the local data mirror holds a task's rows (``<data_dir>/lm-eval/<task>/<split>.jsonl``, hub row
schema) a generated YAML ``include``\\ s the standard one and swaps only the data source to that
file; otherwise the standard hub task runs (needs the hub, or a populated ``HF_HOME``).

The paper reports ``acc`` (docs/methods.md §7.2); ``acc_norm`` is recorded as well where the task
has it, with the task versions and sample counts.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from basis_sharing.config import PAPER_ZEROSHOT_TASKS
from basis_sharing.data.rows import REPAIR_HINT, json_lines_file, missing_fields
from basis_sharing.errors import BadDataError, ConfigError, DataNotFoundError, unknown_choice
from basis_sharing.hub import hub_available

log = logging.getLogger(__name__)

MIRROR_SUBDIR = "lm-eval"


@dataclass(frozen=True)
class ZeroShotTask:
    """One of lm-eval's standard tasks: its YAML (under ``lm_eval/tasks``) and scored split.

    ``fields`` are the row fields the YAML (and its helper functions) read; ``a.b`` is field b of
    object a. A mirror row without one would fail inside lm-eval after the model has loaded.
    """

    name: str
    yaml: str
    split: str
    fields: tuple[str, ...]


ARC_FIELDS = ("question", "choices.text", "choices.label", "answerKey")
OPENBOOKQA_FIELDS = ("question_stem", "choices.text", "choices.label", "answerKey")

# Where each task lives in lm-eval and what its rows hold: (YAML, scored split, row fields). Its
# keys are config.PAPER_ZEROSHOT_TASKS (tests/test_config.py checks it).
TASK_SOURCES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", OPENBOOKQA_FIELDS),
    "arc_easy": ("arc/arc_easy.yaml", "test", ARC_FIELDS),
    "winogrande": (
        "winogrande/default.yaml",
        "validation",
        ("sentence", "option1", "option2", "answer"),
    ),
    "hellaswag": (
        "hellaswag/hellaswag.yaml",
        "validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    ),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", ARC_FIELDS),
    "piqa": ("piqa/piqa.yaml", "validation", ("goal", "sol1", "sol2", "label")),
    "mathqa": ("mathqa/mathqa.yaml", "test", ("Problem", "options", "correct")),
}
# The paper's tasks in the paper's order (config.PAPER_ZEROSHOT_TASKS).
PAPER_TASKS: dict[str, ZeroShotTask] = {
    name: ZeroShotTask(name, *TASK_SOURCES[name]) for name in PAPER_ZEROSHOT_TASKS
}


@dataclass(frozen=True)
class TaskSource:
    """Where a task's rows come from: a mirror file (with its checksum) or the hub."""

    task: ZeroShotTask
    path: Path | None = None
    sha256: str | None = None

    @property
    def local(self) -> bool:
        return self.path is not None

    def provenance(self) -> dict[str, Any]:
        if self.path is None:
            return {"source": "hub", "split": self.task.split}
        return {"source": "mirror", "path": str(self.path), "sha256": self.sha256}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def mirror_file(data_dir: str | Path, task: ZeroShotTask) -> Path:
    return Path(data_dir).expanduser() / MIRROR_SUBDIR / task.name / f"{task.split}.jsonl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_tasks(names: list[str], data_dir: str | Path, offline: bool) -> list[TaskSource]:
    """Each task's data source; unknown names, or hub-only tasks when offline, fail here."""
    sources = []
    for name in names:
        if name not in PAPER_TASKS:
            raise unknown_choice("zero-shot task (eval.zeroshot.tasks)", name, list(PAPER_TASKS))
        task = PAPER_TASKS[name]
        path = mirror_file(data_dir, task)
        if path.is_file():
            check_task_rows(task, path)
            sources.append(TaskSource(task, path.resolve(), _sha256(path)))
        elif not hub_available(offline):
            raise DataNotFoundError(
                f"Zero-shot task {name}: no local rows at {path}, and the hub is unreachable "
                "(or offline=true), so the standard hub task cannot be downloaded. Point "
                f"paths.data_dir at a mirror with {MIRROR_SUBDIR}/{name}/{task.split}.jsonl "
                "(e.g. ../shared/assets), set "
                "offline=false, or drop the task from eval.zeroshot.tasks."
            )
        else:
            sources.append(TaskSource(task))
    return sources


def check_task_rows(task: ZeroShotTask, path: Path) -> None:
    """Every row of a mirror task file is a JSON object with the fields the task reads.

    Raises:
        BadDataError: the file is not UTF-8, has no rows, or a row is not a JSON object or lacks
            a field; names the file and the line.
    """
    rows = 0
    for number, row in json_lines_file(path):
        missing = missing_fields(row, task.fields)
        if missing:
            raise BadDataError(
                f"Zero-shot task {task.name}: {path} line {number} lacks "
                f"{', '.join(missing)} (null or absent); lm-eval's {task.yaml} reads "
                f"{', '.join(task.fields)} from every row. " + REPAIR_HINT
            )
        rows += 1
    if rows == 0:
        raise BadDataError(
            f"Zero-shot task {task.name}: {path} holds no rows, so there is nothing to score. "
            + REPAIR_HINT
        )


def local_task_yaml(source: TaskSource, dataset_cache: Path) -> dict[str, Any]:
    """lm-eval's standard task with only the data source swapped to the mirror file."""
    standard = lm_eval_tasks_dir() / source.task.yaml
    if not standard.is_file():
        raise ConfigError(
            f"lm-eval's task file {standard} is missing; this lm-eval version does not ship "
            f"task {source.task.name} where expected."
        )
    split = source.task.split
    return {
        "include": str(standard),
        "task": source.task.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(source.path)},
            "cache_dir": str(dataset_cache),
        },
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }


def write_local_tasks(sources: list[TaskSource], task_dir: Path, dataset_cache: Path) -> Path:
    """One YAML per mirror-backed task in ``task_dir`` (for ``TaskManager(include_path=...)``)."""
    import yaml

    task_dir.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if source.local:
            text = yaml.safe_dump(local_task_yaml(source, dataset_cache), sort_keys=False)
            (task_dir / f"{source.task.name}.yaml").write_text(text)
    return task_dir


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    include_path: Path | None,
    include_defaults: bool,
    limit: int | float | None,
    batch_size: int,
    max_length: int | None,
    log_samples: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """``simple_evaluate`` on the in-memory ``model``, zero-shot; lm-eval's raw result dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        device=str(device),
        batch_size=batch_size,
        max_length=max_length,
    )
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
    )
    try:
        result = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=1000,  # acc stderr is closed-form; 0 would drop it
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if result is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results on this process.")
    return result


def _number(value: Any) -> float | None:
    if value is None or value == "N/A":
        return None
    value = float(value)
    return None if math.isnan(value) else value


def summarize(result: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """acc / acc_norm (and their stderr), version and sample counts per task."""
    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        metrics = result["results"][name]
        row: dict[str, Any] = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                row[metric] = _number(metrics[f"{metric},none"])
                row[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
        row["version"] = result.get("versions", {}).get(name)
        counts = result.get("n-samples", {}).get(name, {})
        row["n_samples"] = counts.get("effective")
        row["n_docs"] = counts.get("original")
        out[name] = row
    return out


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer,
    sources: list[TaskSource],
    *,
    work_dir: Path,
    dataset_cache: Path,
    limit: int | float | None,
    batch_size: int,
    max_length: int | None,
) -> dict[str, Any]:
    """The seven-task protocol (or a subset): per-task metrics, sources, and the mean ``acc``.

    Mirror-backed tasks and hub tasks run in separate harness calls: the first indexes only the
    generated YAMLs (fast, no network), the second lm-eval's full task index.
    """
    local = [s.task.name for s in sources if s.local]
    remote = [s.task.name for s in sources if not s.local]
    tasks: dict[str, dict[str, Any]] = {}
    if local:
        task_dir = write_local_tasks(sources, work_dir / "lm_eval_tasks", dataset_cache)
        raw = run_lm_eval(
            model,
            tokenizer,
            local,
            include_path=task_dir,
            include_defaults=False,
            limit=limit,
            batch_size=batch_size,
            max_length=max_length,
        )
        tasks.update(summarize(raw, local))
    if remote:
        raw = run_lm_eval(
            model,
            tokenizer,
            remote,
            include_path=None,
            include_defaults=True,
            limit=limit,
            batch_size=batch_size,
            max_length=max_length,
        )
        tasks.update(summarize(raw, remote))
    for source in sources:
        tasks[source.task.name]["data"] = source.provenance()
    accs = [tasks[s.task.name]["acc"] for s in sources]
    return {
        "tasks": {s.task.name: tasks[s.task.name] for s in sources},
        "mean_acc": sum(accs) / len(accs) if accs and None not in accs else None,
        "limit": limit,
        "num_fewshot": 0,
    }
