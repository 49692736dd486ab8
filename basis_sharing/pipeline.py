"""The one pipeline every run goes through (docs/architecture.md §1.1).

``run`` validates the config (``preflight``), resumes a completed job instead of recomputing it,
then executes the run's stage list (``stages.build_stages``) on one typed run state, under the
output directory's lock, ending the record as completed or failed. Each stage's wall time and peak
memory, and every result, go to ``results.json`` as soon as they exist.

Under torchrun (runtime/distributed.py) rank 0 is that run; every other rank waits for rank 0 to
go ahead (not resumed, not refused), runs only the stages up to the calibration they compute
together (``stages.worker_stages``) and returns, writing no record, cache or tracker run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from basis_sharing.errors import UserError
from basis_sharing.files import directory_lock
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.preflight import validate
from basis_sharing.runtime import distributed
from basis_sharing.runtime.distributed import World
from basis_sharing.stages import Plan, RunState, Stage, build_stages, run_stages, worker_stages
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

    Returns:
        the record; on a data-parallel rank other than 0 the in-memory one of the stages it ran
        (never written), or {} when rank 0 resumed or refused the job or ran it alone.
    """
    hydra = hydra_context()
    out_dir = Path(out_dir or hydra.get("out_dir") or ".")
    plan = validate(cfg)
    world = distributed.init(plan.device, cfg.runtime.distributed_backend)
    if world.size > 1:  # each rank on its own GPU
        plan = replace(plan, device=world.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = config_fingerprint(config)
    workers = Workers(world, worker_stages(build_stages(cfg, plan)) if world.size > 1 else [])
    if not world.is_main:
        return run_worker(cfg, plan, workers, out_dir, config, fingerprint, hydra, caches)
    try:
        return run_main(cfg, plan, workers, out_dir, config, fingerprint, hydra, caches)
    finally:
        workers.release(go=False)  # resumed or refused: they stop too (no-op once released)


def run_main(
    cfg: DictConfig,
    plan: Plan,
    workers: Workers,
    out_dir: Path,
    config: dict[str, Any],
    fingerprint: str,
    hydra: dict[str, Any],
    caches: SweepCaches | None,
) -> dict[str, Any]:
    """The run itself (rank 0's under torchrun): resume, checks, the record, the stages."""
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
            workers.release(go=True)  # nothing only rank 0 checks can refuse the run now
            caches = caches if caches is not None else SweepCaches()
            state = RunState(cfg, plan, record, caches, world=workers.world)
            execute_recorded(state)
    log.info("Run summary (%s)\n%s", record.path, summary_table(record.data))
    return record.data


@dataclass
class Workers:
    """The ranks other than 0 of a data-parallel launch, as rank 0 and they see each other.

    They wait for rank 0's word before the stages they run (``stages``, none: they are not
    needed and return at once): go, or stop when rank 0 resumed a completed job or refused it.
    """

    world: World
    stages: list[Stage]
    released: bool = False

    @property
    def waiting(self) -> bool:
        return self.world.size > 1 and bool(self.stages)

    def release(self, go: bool) -> None:
        """Rank 0: tell the waiting ranks whether the run goes ahead (the first call counts)."""
        if self.waiting and not self.released:
            self.released = True
            self.world.broadcast_object(go)

    def wait(self) -> bool:
        """Another rank: whether rank 0 went ahead (False at once when they are not needed)."""
        return self.waiting and bool(self.world.broadcast_object(None))


def run_worker(
    cfg: DictConfig,
    plan: Plan,
    workers: Workers,
    out_dir: Path,
    config: dict[str, Any],
    fingerprint: str,
    hydra: dict[str, Any],
    caches: SweepCaches | None,
) -> dict[str, Any]:
    """A rank other than 0: the stages up to the shared calibration, no record written."""
    world = workers.world
    if not workers.wait():
        log.info("%s: nothing to compute for this job (rank 0 runs it).", world.describe())
        return {}
    threads = apply_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    record = new_record(cfg, plan, out_dir, config, fingerprint, hydra, persist=False)
    record["environment"]["threads"] = threads
    caches = caches if caches is not None else SweepCaches()
    state = RunState(cfg, plan, record, caches, world=world)
    run_stages(state, workers.stages)
    record.finish()
    log.info(
        "%s: calibration done; rank 0 compresses, evaluates and writes the record.",
        world.describe(),
    )
    return record.data


def new_record(
    cfg: DictConfig,
    plan: Plan,
    out_dir: Path,
    config: dict[str, Any],
    fingerprint: str,
    hydra: dict[str, Any],
    persist: bool = True,
) -> RunRecord:
    record = RunRecord(
        out_dir,
        config,
        persist=persist,
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
