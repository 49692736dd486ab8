"""Weights & Biases tracker (``logger=wandb``): one W&B run per job, mirroring results.json.

results.json stays the source of truth (tables are built from it, offline); the W&B run mirrors
it while the job runs, so a dashboard shows perplexities and stage timings as they are produced:

- run: ``job_type`` = method, tags from the config choices, the resolved config as run config;
- every write of the run record: each scalar of the tracked sections, under its dotted path in
  results.json (``metrics.perplexity.wikitext2.ppl``, ``stages.compress.wall_s``), is logged once
  when it first appears or changes; numbers go to history and summary, text only to the summary;
- at the end: the fine-tuning losses as series (per optimizer step and per epoch), a table of
  the per-group ranks and parameters and a ``run-record`` artifact holding
  results.json and the resolved config.

``wandb`` is imported only when a run starts (a heavy import that ``logger=none`` never pays).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from basis_sharing.config import WANDB_MODES
from basis_sharing.errors import ConfigError, UserError
from basis_sharing.methods.plan import GroupPlan
from basis_sharing.tracking import schema
from basis_sharing.tracking.loggers import RunLogger
from basis_sharing.tracking.record import RESULTS_FILE, RunRecord
from basis_sharing.tracking.schema import Key

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger(__name__)

# Sections of results.json whose scalars are metrics; the rest (config, environment, data
# provenance, hashes) is static and travels in the run config and the artifact.
TRACKED_SECTIONS = (
    Key.STATUS,
    Key.TARGET_RATIO,
    Key.CALIBRATION,
    Key.PARAMS,
    Key.METHOD_INFO,
    Key.METRICS,
    Key.STAGES,
    Key.FINETUNE,
    Key.ERROR,
)
GROUPS_TABLE_KEY = schema.dotted(Key.METHOD_INFO, schema.GROUPS)
GROUPS_TABLE_COLUMNS = ("kind", "group", "layers", "d_in", "d_out", "rank", "params")
# FiPS: one row per MLP, its local reconstruction (docs/methods.md §9.7).
FIPS_TABLE_KEY = "method_info.fips_mlps"
FIPS_TABLE_COLUMNS = (
    "layer",
    "group",
    "rank",
    "initial_loss",
    "final_loss",
    "group_final_loss",
    "sparsity",
    "steps",
)
FINETUNE_STEP = schema.dotted(Key.FINETUNE, "step")
FINETUNE_EPOCH = schema.dotted(Key.FINETUNE, "epoch")
ARTIFACT_TYPE = "run-record"
CONFIG_FILE = "config.yaml"
MAX_TAG_CHARS = 64  # W&B rejects longer tags


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of nested dicts keyed by dotted path; lists and None values are left out.

    Lists (per-group details, samples) are not metrics: the groups become a table at the end.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        elif isinstance(value, bool | int | float | str):
            flat[path] = value
    return flat


def is_number(value: Any) -> bool:
    """A value W&B can chart (bools are flags, kept in the summary only)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_value(old: Any, new: Any) -> bool:
    """Equality where NaN equals NaN, so a non-finite perplexity is logged once, not per write."""
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return True
    return type(old) is type(new) and old == new


def run_tags(record: dict[str, Any], extra: list[str]) -> list[str]:
    """Model, method, ratio, calibration and fine-tuning choices, then the configured extras.

    The Hydra group choices (``calibration=wikitext2_cpu``) name what was run more precisely than
    the resolved values; without Hydra (``pipeline.run`` called directly) the config is used.
    A method that does not compress gets ``ratio=none``.
    """
    choices = record.get(Key.CHOICES) or {}
    config = record[Key.CONFIG]
    ratio = record.get(Key.TARGET_RATIO)
    tags = [
        choices.get("model", config["model"]["name"]),
        record[Key.METHOD],
        f"ratio={'none' if ratio is None else f'{ratio:g}'}",
        f"calib={choices.get('calibration', config['calibration']['dataset'] or 'none')}",
        f"ft={choices.get('finetune', config['finetune']['name'])}",
        *extra,
    ]
    return list(dict.fromkeys(tags))


def run_name(record: dict[str, Any]) -> str:
    """``<model>-<method>[-r<ratio>]``: readable in the run list (W&B ids stay unique)."""
    ratio = record.get(Key.TARGET_RATIO)
    name = f"{record[Key.CONFIG]['model']['name']}-{record[Key.METHOD]}"
    return name if ratio is None else f"{name}-r{ratio:g}"


def finetune_series(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The fine-tuning losses as W&B history rows: one per optimizer step, one per epoch.

    ``finetune.train_loss`` is charted against ``finetune.step`` and ``finetune.eval_loss``
    against ``finetune.epoch`` (the lists that ``flatten`` leaves out of the record mirror).
    """
    ft = schema.section(record, Key.FINETUNE)
    rows: list[dict[str, Any]] = [
        {FINETUNE_STEP: step, f"{Key.FINETUNE}.train_loss": loss}
        for step, loss in zip(ft.get("steps") or [], ft.get("train_loss") or [], strict=True)
    ]
    rows += [
        {FINETUNE_EPOCH: epoch, f"{Key.FINETUNE}.eval_loss": loss}
        for epoch, loss in enumerate(ft.get("eval_loss") or [], start=1)
    ]
    return rows


def log_finetune_series(run: Run, record: dict[str, Any]) -> None:
    rows = finetune_series(record)
    if not rows:
        return
    run.define_metric(FINETUNE_STEP)
    run.define_metric(FINETUNE_EPOCH)
    run.define_metric(f"{Key.FINETUNE}.train_loss", step_metric=FINETUNE_STEP)
    run.define_metric(f"{Key.FINETUNE}.eval_loss", step_metric=FINETUNE_EPOCH)
    for row in rows:
        run.log(row)


def group_rows(groups: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the ranks table from ``method_info["groups"]`` (``GroupPlan.as_dict`` entries).

    The kept parameters come from ``GroupPlan.params``, the formula the rank plan used.
    """
    rows = []
    for entry in groups:
        plan = GroupPlan(**{**entry, "layers": tuple(entry["layers"])})
        rows.append(
            [
                plan.kind,
                plan.index,
                list(plan.layers),
                plan.d_in,
                plan.d_out,
                plan.rank,
                plan.params,
            ]
        )
    return rows


def fips_rows(block_groups: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the FiPS table from ``method_info["block_groups"]``."""
    return [
        [
            mlp["layer"],
            group["index"],
            group["rank"],
            mlp["initial_loss"],
            mlp["final_loss"],
            mlp["group_final_loss"],
            mlp["sparsity"],
            mlp["steps"],
        ]
        for group in block_groups
        for mlp in group["mlps"]
    ]


class RecordMirror:
    """Record listener: logs each tracked scalar when it first appears or changes."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.logged: dict[str, Any] = {}

    def __call__(self, data: dict[str, Any]) -> None:
        flat = flatten({key: data.get(key) for key in TRACKED_SECTIONS})
        changed = {
            key: value
            for key, value in flat.items()
            if key not in self.logged or not same_value(self.logged[key], value)
        }
        if not changed:
            return
        self.logged.update(changed)
        numbers = {key: value for key, value in changed.items() if is_number(value)}
        if numbers:
            self.run.log(numbers)  # one history step per record write; also sets the summary
        texts = {key: value for key, value in changed.items() if key not in numbers}
        if texts:
            self.run.summary.update(texts)


@dataclass
class WandbLogger(RunLogger):
    """Settings of ``conf/logger/wandb.yaml``, checked; a W&B run is opened per ``track``."""

    mode: str
    project: str
    entity: str | None
    group: str | None
    dir: Path | None  # None: the job's output directory
    tags: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> WandbLogger:
        """Check the logger settings (no wandb import: it happens when the run starts)."""
        lc = cfg.logger
        if lc.mode not in WANDB_MODES:
            raise ConfigError(
                f"logger.mode={lc.mode!r} is not a W&B mode: use offline (the default: files on "
                "disk, uploaded later with `wandb sync`), online (needs `wandb login`) or "
                "disabled (no files, no network)."
            )
        tags = [str(tag) for tag in lc.tags]
        for tag in tags:
            if not tag or len(tag) > MAX_TAG_CHARS:
                raise ConfigError(
                    f"logger.tags: {tag!r} must have 1 to {MAX_TAG_CHARS} characters (W&B's limit)."
                )
        if importlib.util.find_spec("wandb") is None:
            raise UserError(
                "logger=wandb needs the wandb package: pip install wandb (or use logger=none)."
            )
        return cls(
            mode=lc.mode,
            project=lc.project,
            entity=lc.entity,
            # An experiment_name key that exists but is null also means "no experiment".
            group=lc.group if lc.group is not None else cfg.model.name,
            dir=Path(lc.dir).expanduser() if lc.dir is not None else None,
            tags=tags,
        )

    @contextmanager
    def track(self, record: RunRecord) -> Iterator[None]:
        """One W&B run for the block, finished even when the block raises (exit code 1).

        Each job of a Hydra multirun (the basic launcher runs them in one process) gets its own
        run. ``reinit="finish_previous"`` closes a run some earlier job could have left open, so
        ``wandb.run`` is always this job's run (integrations such as transformers' callback log
        to it).
        """
        import wandb

        run = self._start(wandb, record)
        mirror = RecordMirror(run)
        record.listeners.append(mirror)
        exit_code = 1
        try:
            mirror(record.data)
            yield
            exit_code = 0
        finally:
            record.listeners.remove(mirror)
            try:
                mirror(record.data)
                if self.mode != "disabled":  # an artifact would still stage files on disk
                    self._log_outputs(wandb, run, record)
            except Exception:
                if exit_code == 0:
                    exit_code = 1  # the job completed, but its W&B run is incomplete
                    raise
                # Keep the job's own error; the run is still closed as failed below.
                log.exception("Could not log the failed run's outputs to W&B")
            finally:
                run.finish(exit_code=exit_code)

    def _start(self, wandb, record: RunRecord) -> Run:
        root = self.dir or record.out_dir
        if self.mode != "disabled":
            root.mkdir(parents=True, exist_ok=True)
        try:
            return wandb.init(
                mode=self.mode,  # explicit: WANDB_MODE changes after the first init are ignored
                project=self.project,
                entity=self.entity,
                group=self.group,
                job_type=record[Key.METHOD],
                name=run_name(record.data),
                tags=run_tags(record.data, self.tags),
                config=record[Key.CONFIG],
                dir=str(root),
                reinit="finish_previous",
            )
        except wandb.errors.Error as exc:
            record.fail(exc)
            raise UserError(
                f"W&B could not start a run ({exc}). Log in with `wandb login`, or use "
                "logger.mode=offline and upload later with `wandb sync`."
            ) from exc

    def _log_outputs(self, wandb, run: Run, record: RunRecord) -> None:
        """The ranks table and the run-record artifact (results.json + resolved config)."""
        log_finetune_series(run, record.data)
        groups = schema.groups(record.data)
        if groups:
            table = wandb.Table(columns=list(GROUPS_TABLE_COLUMNS), data=group_rows(groups))
            run.log({GROUPS_TABLE_KEY: table})
        block_groups = (record.data.get(Key.METHOD_INFO) or {}).get("block_groups")
        if block_groups:
            table = wandb.Table(columns=list(FIPS_TABLE_COLUMNS), data=fips_rows(block_groups))
            run.log({FIPS_TABLE_KEY: table})
        artifact = wandb.Artifact(
            f"run-record-{run.id}",
            type=ARTIFACT_TYPE,
            description="results.json and the resolved config of one basis-sharing job",
            metadata={
                Key.STATUS: record[Key.STATUS],
                Key.METHOD: record[Key.METHOD],
                "model": record[Key.CONFIG]["model"]["name"],
                Key.TARGET_RATIO: record.data.get(Key.TARGET_RATIO),
            },
        )
        artifact.add_file(str(record.path), name=RESULTS_FILE)
        with artifact.new_file(CONFIG_FILE) as f:
            f.write(OmegaConf.to_yaml(record[Key.CONFIG]))
        run.log_artifact(artifact)
