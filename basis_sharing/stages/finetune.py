"""The finetune stage: the configured fine-tuner trains the compressed model in place.

It is in the stage list only when ``finetune`` names a fine-tuner (``finetune=none``: no stage),
between compress and save, so a saved model and every evaluation see the trained weights. Its
facts go to the record's ``finetune`` section; the parameter report is taken again afterwards, so
that weights a fine-tuner adds (adapters, say) are counted.
"""

from __future__ import annotations

from pathlib import Path

from basis_sharing.finetune.registry import FinetuneContext
from basis_sharing.stages.compress import account
from basis_sharing.stages.state import RunState
from basis_sharing.tracking.schema import Key


def finetune(state: RunState) -> None:
    cfg = state.cfg
    ctx = FinetuneContext(
        device=state.plan.device,
        tokenizer=state.tokenizer,
        out_dir=Path(state.record.out_dir),
        data_dir=cfg.paths.data_dir,
        offline=cfg.offline,
        seed=cfg.seed,
    )
    state.record[Key.FINETUNE] = state.plan.finetuner.finetune(state.model, state.family, ctx)
    account(state)
