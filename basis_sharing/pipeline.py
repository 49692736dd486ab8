"""The one pipeline every run goes through (docs/architecture.md §1.1).

``run`` validates the config (``preflight``), resumes a completed job instead of recomputing it,
then executes the run's stage list (``stages.build_stages``) on one typed run state, under the
output directory's lock, ending the record as completed or failed. Each stage's wall time and peak
memory, and every result, go to ``results.json`` as soon as they exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from basis_sharing.errors import UserError
from basis_sharing.files import directory_lock
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.preflight import validate
from basis_sharing.stages import Plan, RunState, build_stages, run_stages
from basis_sharing.stages.save import check_save_target
from basis_sharing.threads import apply_threads
from basis_sharing.tracking.loggers import make_logger
from basis_sharing.tracking.record import RunRecord, summary_table
from basis_sharing.tracking.resume import config_fingerprint, find_completed

__all__ = ["config_fingerprint", "main", "run", "validate"]

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig, out_dir: str | Path | None = None, caches: SweepCaches | None = None
) -> dict[str, Any]:
    """Run one job and return its record (also written to ``<out_dir>/results.json``).

    Args:
        caches: what the jobs of one sweep share (decompositions, ASVD's sensitivities); the
            caller owns it and passes the same object to every job. None: a fresh one that lives
            for this job only.
    """
    hydra = hydra_context()
    out_dir = Path(out_dir or hydra.get("out_dir") or ".")
    plan = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = config_fingerprint(config)
    done = None if cfg.force else find_completed(out_dir, config)
    if done is not None and cfg.save_model and not done[1].get("saved_model"):
        log.info("Recomputing %s: save_model=true but that run saved no model.", done[0])
        done = None
    if done is not None:  # resume: a finished job of a re-run sweep is not computed again
        log.info(
            "Skipped: %s is a completed run of this configuration (fingerprint %s); "
            "force=true recomputes it.",
            done[0],
            fingerprint,
        )
        return done[1]
    check_save_target(cfg, out_dir)  # after the resume check: a skipped job saves nothing
    tracker = make_logger(cfg)  # logger=none: a no-op; checked before any work
    threads = apply_threads(cfg.threads)  # before any work: sizes torch and BLAS pools
    torch.manual_seed(cfg.seed)
    with directory_lock(out_dir):  # a second process on this directory stops here, at once
        record = new_record(cfg, plan, out_dir, config, fingerprint, hydra)
        record["environment"]["threads"] = threads
        record.write()
        with tracker.track(record):  # mirrors every record write; closes the tracker's run
            state = RunState(cfg, plan, record, caches if caches is not None else SweepCaches())
            execute_recorded(state)
    log.info("Run summary (%s)\n%s", record.path, summary_table(record.data))
    return record.data


def new_record(
    cfg: DictConfig,
    plan: Plan,
    out_dir: Path,
    config: dict[str, Any],
    fingerprint: str,
    hydra: dict[str, Any],
) -> RunRecord:
    record = RunRecord(
        out_dir,
        config,
        fingerprint=fingerprint,
        method=cfg.method.name,
        target_ratio=float(cfg.ratio) if plan.method.compresses else None,
        seed=cfg.seed,
        device=str(plan.device),
        overrides=hydra.get("overrides", []),
        choices=hydra.get("choices", {}),
    )
    record["model"].update(
        name=cfg.model.name,
        hf_id=cfg.model.hf_id,
        revision=cfg.model.revision,
        dtype=cfg.model.dtype,
        context_length=cfg.model.context_length,
    )
    return record


def execute_recorded(state: RunState) -> None:
    """The run's stages, ending the record as completed or failed (with the error) either way."""
    record = state.record
    try:
        run_stages(state, build_stages(state.cfg, state.plan))
    except BaseException as exc:
        record.fail(exc)
        if record.path != record.final_path:
            log.error(
                "This run failed; the earlier completed record %s is kept unchanged and "
                "this run's record is %s.",
                record.final_path,
                record.path,
            )
        raise
    record.finish()


def hydra_context() -> dict[str, Any]:
    """Output dir, overrides and group choices of the current Hydra job (if any)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {
        k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra/", "schema"))
    }
    return {
        "out_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "choices": choices,
    }


def main(cfg: DictConfig, caches: SweepCaches | None = None) -> None:
    """Hydra entry: user errors end the process with their message instead of a traceback."""
    try:
        run(cfg, caches=caches)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
