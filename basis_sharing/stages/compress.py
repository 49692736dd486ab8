"""The compress stage: the method on the loaded model, then what it kept, counted and checked."""

from __future__ import annotations

import logging

import torch

from basis_sharing.config import forward_dtype, is_auto_batch
from basis_sharing.evaluation.params import budget_ratio, parameter_report
from basis_sharing.evaluation.throughput import rank_above_break_even, summarize_break_even
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.runtime import make_runner
from basis_sharing.stages.checks import check_ratio
from basis_sharing.stages.state import RunState
from basis_sharing.tracking.record import RunRecord

log = logging.getLogger(__name__)


def compress(state: RunState) -> None:
    """Compress in place; record the method's facts, the parameter report and the ratio check."""
    cfg, plan, record = state.cfg, state.plan, state.record
    ctx = CompressionContext(
        ratio=cfg.ratio,
        device=plan.device,
        calibration_ids=state.calibration_ids,
        stats=state.stats,
        calib_batch_size=compress_batch_size(state),
        caches=state.caches,
        stats_key=state.stats_key,
        gram_dtype=getattr(torch, cfg.calibration.gram_dtype),
        runner=make_runner(cfg.runtime, state.model, state.family, plan.device),
        forward_dtype=forward_dtype(cfg),
    )
    record["method_info"] = plan.method.compress(state.model, state.family, ctx)
    account(state)
    if plan.method.compresses:
        kinds = state.budget[0] if state.budget else None
        check_ratio(budget_ratio(record["params"]), cfg.ratio, cfg.ratio_tolerance, kinds=kinds)


def compress_batch_size(state: RunState) -> int:
    """The calibration batch size of the method's own passes (updates, ASVD's search): the
    calibrate stage's choice under ``auto``; a method that needs no calibration gets 1."""
    value = state.cfg.model.calib_batch_size
    if not is_auto_batch(value):
        return int(value)
    return state.calib_batch_size or 1


def account(state: RunState) -> None:
    """The parameter report of the model as it is now, and its break-even check."""
    record = state.record
    budget = state.budget
    record["params"] = parameter_report(state.model, state.family, state.dense_weights, budget)
    planned = (record["method_info"] or {}).get("planned_params")
    if planned is not None:
        record["params"]["planned_decoder_projections"] = planned["kept"]
    check_break_even(state.model, record)


def check_break_even(model, record: RunRecord) -> None:
    """Record (and warn about) factorised projections slower than their dense layer."""
    slow = rank_above_break_even(model)
    record["params"]["above_break_even"] = slow
    if slow:
        log.warning(
            "%d factorised projections have a rank above the break-even point, where (x B) C "
            "costs more multiply-adds than x W, so they are slower than the dense layer: %s",
            len(slow),
            summarize_break_even(slow),
        )
