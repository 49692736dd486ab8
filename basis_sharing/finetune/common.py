"""What LoRA and full fine-tuning share: the training settings, data, loop and record.

The settings' defaults are the paper's (docs/methods.md §6.2): a fine-tuner's schema subclasses
``TrainingConfig`` and changes only what differs. A ``TrainingFinetuner`` reads its training and
evaluation blocks through the data layer, prepares the model (``prepare``: what is trained),
runs the epoch loop (``loop.train``) and ends (``finish``: LoRA merges its adapters back).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basis_sharing.config import FinetuneConfig
from basis_sharing.data.corpora import load_corpus, split_source
from basis_sharing.data.tokens import tokenize_text
from basis_sharing.data.training import BlockSet, check_split_available, split_blocks
from basis_sharing.errors import ConfigError
from basis_sharing.finetune import loop
from basis_sharing.finetune.registry import FinetuneContext, Finetuner
from basis_sharing.models.families import FamilyAdapter

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig(FinetuneConfig):
    """Training settings both fine-tuners have; defaults are the paper's LoRA run (§6.2)."""

    dataset: str = "wikitext2"
    train_split: str = "train"  # the paper's; the offline mirror has none (see finetune_smollm)
    eval_split: str = "validation"  # the per-epoch evaluation loss (and the best epoch)
    holdout_fraction: float = 0.1  # train_split == eval_split: last blocks held out for eval
    block_len: int | None = None  # tokens per block; None: model.context_length
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch; None: every block
    max_eval_blocks: int | None = None  # None: every evaluation block
    epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # the Trainer's default
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 42
    data_seed: int = 0
    bf16: bool | None = None  # None: bf16 on a GPU that has it, fp32 on the CPU
    keep_best: bool = True  # end with the epoch of the lowest evaluation loss

    @staticmethod
    def check(node: Any) -> None:
        """Ranges of the training settings (the config alone)."""
        if not node.lr > 0:
            raise ConfigError(f"finetune.lr={node.lr} must be > 0.")
        for key in ("epochs", "batch_size", "grad_accum"):
            if node[key] < 1:
                raise ConfigError(f"finetune.{key}={node[key]} must be >= 1.")
        for key in ("steps_per_epoch", "max_eval_blocks"):
            if node[key] is not None and node[key] < 1:
                raise ConfigError(f"finetune.{key}={node[key]} must be >= 1 or null.")
        if node.block_len is not None and node.block_len < 2:
            raise ConfigError(f"finetune.block_len={node.block_len} must be >= 2 tokens or null.")
        if not 0.0 < node.holdout_fraction < 1.0:
            raise ConfigError(
                f"finetune.holdout_fraction={node.holdout_fraction} must be in (0, 1)."
            )
        if node.weight_decay < 0:
            raise ConfigError(f"finetune.weight_decay={node.weight_decay} must be >= 0.")
        if not node.max_grad_norm > 0:
            raise ConfigError(f"finetune.max_grad_norm={node.max_grad_norm} must be > 0.")
        split_source(node.dataset, node.train_split)
        split_source(node.dataset, node.eval_split)


class TrainingFinetuner(Finetuner):
    """A fine-tuner that trains some tensors of the model with ``loop.train``."""

    def check_config(self) -> None:
        type(self).schema.check(self.cfg)

    def check_run(self, run_cfg: Any) -> None:
        cfg, context = self.cfg, run_cfg.model.context_length
        if cfg.block_len is not None and cfg.block_len > context:
            raise ConfigError(
                f"finetune.block_len={cfg.block_len} is longer than model.context_length="
                f"{context}; use finetune.block_len<={context}."
            )
        data_dir, offline = run_cfg.paths.data_dir, run_cfg.offline
        check_split_available(
            cfg.dataset, cfg.train_split, data_dir, offline, "finetune.train_split"
        )
        check_split_available(cfg.dataset, cfg.eval_split, data_dir, offline, "finetune.eval_split")

    # ---- what a subclass says ------------------------------------------------------------
    def prepare(self, model: nn.Module, family: FamilyAdapter) -> tuple[nn.Module, dict[str, Any]]:
        """The module to train (``model`` or a wrapper) and facts for the record."""
        raise NotImplementedError

    def finish(self, trained: nn.Module, model: nn.Module, ctx: FinetuneContext) -> dict[str, Any]:
        """After training: leave ``model`` as a plain compressed model; facts for the record."""
        return {}

    # ---- the run ---------------------------------------------------------------------------
    def blocks(self, ctx: FinetuneContext) -> tuple[BlockSet, BlockSet]:
        cfg = self.cfg
        block_len = cfg.block_len or ctx.context_length
        corpora = []
        for split in (cfg.train_split, cfg.eval_split):
            corpus = load_corpus(cfg.dataset, split, ctx.data_dir, ctx.offline)
            corpora.append((corpus, tokenize_text(ctx.tokenizer, corpus.text())))
        return split_blocks(
            corpora[0], corpora[1], block_len, cfg.holdout_fraction, cfg.max_eval_blocks
        )

    def finetune(self, model: nn.Module, family: FamilyAdapter, ctx: FinetuneContext) -> dict:
        start = time.perf_counter()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        train_set, eval_set = self.blocks(ctx)
        log.info(
            "Fine-tuning (%s) on %s, %d blocks of %d tokens; evaluation loss on %s, %d blocks",
            self.name,
            train_set.corpus.describe(),
            train_set.blocks.shape[0],
            train_set.blocks.shape[1],
            eval_set.corpus.describe(),
            eval_set.blocks.shape[0],
        )
        params_before = count_parameters(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        trained, info = self.prepare(model, family)
        trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
        key = checkpoint_key(ctx.fingerprint, trainable)
        history = loop.train(
            trained, trainable, train_set, eval_set, self.cfg, ctx.out_dir, ctx.device, key
        )
        info.update(self.finish(trained, model, ctx))
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        params_after = count_parameters(model)
        if params_after != params_before:
            raise RuntimeError(
                f"fine-tuning changed the parameter count ({params_before} -> {params_after})"
            )
        return {
            "name": self.name,
            **info,
            "data": {"train": train_set.provenance(), "eval": eval_set.provenance()},
            "precision": "bf16" if loop.use_bf16(self.cfg, ctx.device) else "fp32",
            "trainable_params": sum(p.numel() for p in trainable.values()),
            "params_before": params_before,
            "params_after": params_after,
            "epochs": history.epochs_done,
            "steps": history.steps,
            "train_loss": history.train_loss,
            "eval_loss": history.eval_loss,
            "best_epoch": history.best_epoch,
            "tokens_seen": history.tokens_seen,
            "resumed_from_epoch": history.resumed_from_epoch,
            "train_wall_s": history.train_wall_s,
            "wall_s": time.perf_counter() - start,
            **loop.peak_memory_mb(ctx.device),
        }


def count_parameters(model: nn.Module) -> int:
    """Elements of every parameter, a tensor shared by several modules counted once."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_key(fingerprint: str, trainable: dict[str, nn.Parameter]) -> str:
    """What an epoch checkpoint must match: the run's config and the trainable tensors' shapes."""
    digest = hashlib.sha256(fingerprint.encode())
    for name, param in trainable.items():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
    return digest.hexdigest()[:24]
