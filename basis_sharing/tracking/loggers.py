"""Experiment trackers behind one small interface, chosen by the ``logger`` config group.

The pipeline only does ``with make_logger(cfg).track(record): ...``. A tracker mirrors the run
record while the job runs (``RunRecord.listeners``) and closes its run when the job ends, whether
it completed or failed. ``logger=none`` is this module's no-op ``RunLogger``: it imports no
tracking library at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig

from basis_sharing.errors import unknown_choice
from basis_sharing.tracking.record import RunRecord

LOGGERS = ("none", "wandb")


class RunLogger:
    """The no-op tracker (``logger=none``): results.json is the whole record."""

    @contextmanager
    def track(self, record: RunRecord) -> Iterator[None]:
        """Mirror ``record`` for the duration of the block (here: nothing to do)."""
        yield


def make_logger(cfg: DictConfig) -> RunLogger:
    """The tracker ``cfg.logger`` selects, with its settings checked.

    Called before any data or weights are loaded, so a bad tracker setting fails in seconds.
    """
    name = cfg.logger.name
    if name == "none":
        return RunLogger()
    if name == "wandb":
        # The module imports wandb itself only when a run starts.
        from basis_sharing.tracking.wandb_logger import WandbLogger

        return WandbLogger.from_config(cfg)
    raise unknown_choice("logger", name, LOGGERS)
