"""Resuming sweeps: a job whose configuration already has a completed record is not run again.

A sweep of a paper table is hours of GPU time; when it is interrupted (a crash, a pre-empted
node, a typo in the last job) re-running the same command must redo only what is missing. Each
job's record is therefore compared with the job about to run through a *fingerprint*: a hash of
the resolved config without the keys that cannot change a result (where files live, the device,
offline, the tracker, ``force`` itself, in-process cache sizes). A record counts only when its
status is ``completed``; a ``running`` one (the process died) or a ``failed`` one is recomputed.

The fingerprint is recomputed from the ``config`` stored in each results.json rather than trusted
from a stored field, so records written before fingerprints existed are recognised too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from basis_sharing.tracking.record import RESULTS_FILE

log = logging.getLogger(__name__)

# 2: save_model, save_model_overwrite and threads left the fingerprint (they change no result),
# and the GQA default (narrow k/v private) changed what a config without method.shared computes,
# so records fingerprinted by version 1 are recomputed rather than reused.
FINGERPRINT_VERSION = 2

# Keys (dotted paths) that do not change what a run computes.
NON_RESULT_KEYS = (
    "hydra",
    "paths",
    "device",
    "runtime.distributed_backend",  # like device: how the ranks talk, not what they compute
    "threads",  # like device: how fast, not what (the record keeps the count)
    "offline",
    "force",
    "logger",
    "experiment_name",  # only groups runs in the tracker
    "method.decomposition_cache_mb",
    "save_model",  # resuming a run that saved no model with save_model=true recomputes it
    "save_model_overwrite",
)


def _drop(node: Any, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        node.pop(leaf, None)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of the settings that determine a run's results.

    ``config`` is the resolved config as a plain container (``results.json["config"]``). The JSON
    round trip makes a freshly composed config and one read back from disk hash the same.
    """
    plain = json.loads(json.dumps(copy.deepcopy(dict(config)), default=str))
    for key in NON_RESULT_KEYS:
        _drop(plain, key)
    payload = json.dumps(
        {"fingerprint_version": FINGERPRINT_VERSION, "config": plain},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_record(path: Path) -> dict[str, Any] | None:
    """A results.json, or None when it is missing or unreadable (never an exception)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_completed(
    out_dir: str | Path, config: Mapping[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """The completed record of this configuration in ``out_dir``, if there is one.

    A record of a different configuration (the job directory is named by the overrides only, so
    a changed default lands in the same place) is reported and left for the new run to replace.
    """
    path = Path(out_dir) / RESULTS_FILE
    record = read_record(path)
    if record is None or record.get("status") != "completed":
        return None
    stored = record.get("config")
    if not isinstance(stored, dict):
        return None
    current = config_fingerprint(config)
    if config_fingerprint(stored) != current:
        log.info("%s holds a completed run of another configuration; recomputing.", path)
        return None
    if record.get("fingerprint") not in (None, current):
        # The same config meant something else to the version that wrote it (a changed default).
        log.info("%s was fingerprinted by an older version of this code; recomputing.", path)
        return None
    return path, record
