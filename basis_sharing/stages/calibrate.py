"""The calibrate stage: the statistics the method reads, each from the disk cache when it can."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from basis_sharing.calibration.batching import choose_batch_size
from basis_sharing.calibration.cache import stats_key
from basis_sharing.calibration.statistics import (
    check_forward_device,
    collect_statistics,
    forward_autocast,
)
from basis_sharing.config import forward_dtype, is_auto_batch
from basis_sharing.runtime import SEQUENTIAL, make_runner
from basis_sharing.stages.state import RunState

log = logging.getLogger(__name__)


def calibrate(state: RunState) -> None:
    """Collect (or load) every statistic in ``method.stats_needed``.

    Cache keys cover the model identity, the calibration token ids (hence tokenizer, dataset,
    split, sample count, length and seed), the statistic and the Gram accumulation dtype. The key
    of the whole calibration setup (``state.stats_key``) lets a sweep reuse decompositions.
    The missing forward statistics share one hooked pass, block by block with runtime=sequential.
    ``model.calib_batch_size=auto`` is resolved here (``calibration_batch_size``), once, for the
    pass and the updates after it; ``calibration.gram_device=cpu`` keeps the Grams on the CPU.
    Under torchrun every rank runs this stage on its shard of the calibration batches
    (``state.world``); the record notes how many processes calibrated and their backend.
    """
    cfg, record = state.cfg, state.record
    gram_dtype = cfg.calibration.gram_dtype
    identity = model_identity(record["model"])
    autocast = forward_dtype(cfg)
    if autocast is not None:  # other statistics: part of every key (and of the sweep's reuse)
        identity["calibration_forward_dtype"] = autocast
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    calibration_hash = record["hashes"]["calibration"]
    needed = state.plan.method.stats_needed
    meta = {"model": identity, "calibration": OmegaConf.to_container(cfg.calibration)}
    summary: dict[str, Any] = {
        "gram_dtype": gram_dtype,
        "tokens": int(state.calibration_ids.numel()),
        "forward_dtype": autocast or cfg.model.dtype,
    }
    device = state.plan.device
    if autocast is not None:  # true / false, or None off the CPU or where its flags are unknown
        summary["forward_dtype_native"] = check_forward_device(device, autocast)
    batch_size = calibration_batch_size(state, summary)
    gram_store = "cpu" if cfg.calibration.gram_device == "cpu" else None
    if gram_store is not None:
        summary["gram_device"] = "cpu"
    with forward_autocast(device, autocast):
        collected = collect_statistics(
            sorted(needed),
            state.model,
            state.family,
            state.calibration_ids,
            batch_size,
            gram_dtype,
            identity,
            calibration_hash,
            cache_dir,
            meta,
            runner=make_runner(cfg.runtime, state.model, state.family, state.plan.device),
            world=state.world,
            gram_store=gram_store,
        )
    state.stats = {name: c.value for name, c in collected.items()}
    for name, c in collected.items():
        summary[name] = {"stats_key": c.key, "cache_hit": c.cache_hit}
    state.stats_key = stats_key(identity, calibration_hash, gram_dtype)
    summary["stats_key"] = state.stats_key
    summary["cache_hit"] = all(v["cache_hit"] for k, v in summary.items() if k in needed)
    if state.world.size > 1:
        summary["world_size"] = state.world.size
        summary["backend"] = state.world.backend
    record["calibration"] = summary


def calibration_batch_size(state: RunState, summary: dict[str, Any] | None = None) -> int:
    """``model.calib_batch_size``, or with ``auto`` the batch that fills the device
    (``calibration.batching``), decided once per run and kept on ``state``; the choice and the
    byte counts behind it go to ``summary["batch"]``."""
    cfg = state.cfg
    if not is_auto_batch(cfg.model.calib_batch_size):
        return int(cfg.model.calib_batch_size)
    if state.calib_batch_size is None:
        runtime = cfg.runtime
        sequential = runtime.name == SEQUENTIAL
        autocast = forward_dtype(cfg)
        choice = choose_batch_size(
            state.model,
            state.family,
            state.calibration_ids,
            state.plan.device,
            cfg.calibration.gram_dtype,
            cfg.calibration.memory_fraction,
            sequential,
            cfg.calibration.gram_device,
            hidden_on_device=sequential and runtime.get("hidden_states") == "device",
            forward_bytes=getattr(torch, autocast).itemsize if autocast else 0,
            world=state.world,
        )
        state.calib_batch_size = choice.batch_size
        state.batch_choice = choice.summary()
        log.info(
            "model.calib_batch_size=auto: %d (free %.2f GiB, resident %.2f GiB, %.1f MiB a sample)",
            choice.batch_size,
            choice.footprint.free / 2**30,
            choice.footprint.resident / 2**30,
            choice.footprint.per_sample / 2**20,
        )
    if summary is not None:
        summary["batch"] = {"auto": True, **state.batch_choice}
    return state.calib_batch_size


def model_identity(model_record: dict) -> dict[str, Any]:
    """What pins the weights: hub commit, GGUF hash or local fingerprint, plus dtype."""
    keys = (
        "source",
        "hf_id",
        "commit",
        "path",
        "weights_fingerprint",
        "gguf_sha256",
        "dtype",
        "name",
    )
    return {k: model_record.get(k) for k in keys if model_record.get(k) is not None}
