"""The finetune stage: the configured fine-tuner trains the compressed model in place.

It is in the stage list only when ``finetune`` names a fine-tuner (``finetune=none``: no stage),
between compress and save, so a saved model and every evaluation see the trained weights. Its
facts go to the record's ``finetune`` section; the parameter report is taken again afterwards and
must equal the one before (a LoRA adapter is merged into the factors it sits on, full
fine-tuning trains the tensors in place), so the achieved ratio is unchanged (docs/methods.md §6).
"""

from __future__ import annotations

import logging
from pathlib import Path

from basis_sharing.finetune.registry import FinetuneContext
from basis_sharing.stages.compress import account
from basis_sharing.stages.state import RunState
from basis_sharing.tracking.schema import Key

log = logging.getLogger(__name__)


def finetune(state: RunState) -> None:
    cfg, record = state.cfg, state.record
    ctx = FinetuneContext(
        device=state.plan.device,
        tokenizer=state.tokenizer,
        out_dir=Path(record.out_dir),
        data_dir=cfg.paths.data_dir,
        offline=cfg.offline,
        seed=cfg.seed,
        context_length=cfg.model.context_length,
        fingerprint=record.data.get(Key.FINGERPRINT) or "",
    )
    before = dict(record[Key.PARAMS])
    record[Key.FINETUNE] = state.plan.finetuner.finetune(state.model, state.family, ctx)
    account(state)
    after = record[Key.PARAMS]
    for key in ("total", "decoder_projections", "achieved_ratio"):
        if key in before and after.get(key) != before[key]:
            raise RuntimeError(
                f"fine-tuning changed params.{key}: {before[key]} -> {after.get(key)}"
            )
    summary = record[Key.FINETUNE].get("data")
    if summary:
        log.info(
            "Fine-tuned on %s/%s (%s), evaluation loss on %s/%s",
            summary["train"]["dataset"],
            summary["train"]["split"],
            summary["train"]["source"],
            summary["eval"]["dataset"],
            summary["eval"]["split"],
        )
