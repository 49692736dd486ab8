"""The save stage: the compressed model next to results.json, with what produced it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from basis_sharing.models.compressed_io import check_target, save_compressed
from basis_sharing.stages.state import RunState

SAVED_MODEL = "compressed_model"  # save_model=true writes <run dir>/compressed_model


def save_model(state: RunState) -> None:
    cfg, record = state.cfg, state.record
    info = {
        "model_name": cfg.model.name,
        "method": cfg.method.name,
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),
        "target_ratio": record["target_ratio"],
        "base_model": record["model"],
        "params": record["params"],
        "method_info": record["method_info"],
        "calibration": record.data.get("calibration"),
        "hashes": record["hashes"],
        "git": record["environment"]["git"],
    }
    path = save_compressed(
        state.model,
        record.out_dir / SAVED_MODEL,
        family=state.family,
        tokenizer=state.tokenizer,
        info=info,
        overwrite=cfg.save_model_overwrite,
    )
    record["saved_model"] = str(path)


def check_save_target(cfg: DictConfig, out_dir: Path) -> None:
    """An earlier save in the run directory is refused now, not after the compression."""
    if cfg.save_model:
        how = "set save_model_overwrite=true"
        check_target(out_dir / SAVED_MODEL, cfg.save_model_overwrite, how)
