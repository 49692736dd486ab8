"""The fine-tuning loop: the Hugging Face Trainer, one epoch at a time (docs/methods.md §6.3).

Why an epoch loop around ``Trainer.train`` rather than one ``train()`` over every epoch: the
Trainer's own checkpoints pickle the optimizer, scheduler and RNG states (``torch.save``), which
this project never writes or loads. Each epoch here is one ``Trainer.train()`` over that epoch's
blocks in an order drawn from ``(data_seed, epoch)`` alone; the AdamW optimizer and the constant
schedule are created once and handed to every epoch's Trainer, so the run is the same optimisation
as one long ``train()``. After each epoch the evaluation loss is computed and an epoch checkpoint is
written: the trainable tensors and the AdamW state as safetensors, the step counts, losses and the
param groups as JSON. A run interrupted during fine-tuning and started again in the same run
directory loads it and continues with the next epoch, reaching bit for bit the weights an
uninterrupted run reaches on the CPU (nothing else carries state between epochs: dropout is off
and the data order is a function of the epoch). The best epoch by evaluation loss is kept, as the
paper's ``load_best_model_at_end`` with metric "loss" does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from tqdm.auto import tqdm

from basis_sharing.data.training import BlockSet

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "finetune"  # under the run directory
CHECKPOINT_TENSORS = "epoch_checkpoint.safetensors"
CHECKPOINT_STATE = "epoch_checkpoint.json"
BEST_TENSORS = "best.safetensors"
PARAM, OPTIM = "param:", "optim:"
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}  # torch / HF Trainer AdamW defaults


class BlockDataset(Dataset):
    """Causal-LM examples from token blocks: labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@dataclass
class History:
    """What the loop has done; saved in the epoch checkpoint and reported in the record."""

    epochs_done: int = 0
    steps: list[int] = field(default_factory=list)  # global optimizer step of each loss
    train_loss: list[float] = field(default_factory=list)  # per optimizer step
    eval_loss: list[float] = field(default_factory=list)  # per epoch
    tokens_seen: int = 0
    best_epoch: int | None = None  # 1-based
    resumed_from_epoch: int | None = None
    train_wall_s: float = 0.0  # summed over the runs that trained


def epoch_order(n_blocks: int, data_seed: int, epoch: int) -> torch.Tensor:
    """The training blocks' order in ``epoch`` (0-based): a permutation seeded by both."""
    generator = torch.Generator().manual_seed(data_seed * 100_003 + epoch)
    return torch.randperm(n_blocks, generator=generator)


def blocks_per_epoch(n_blocks: int, cfg: Any) -> int:
    """Blocks one epoch trains on: all, or ``steps_per_epoch`` optimizer steps' worth."""
    if cfg.steps_per_epoch is None:
        return n_blocks
    return min(n_blocks, cfg.steps_per_epoch * cfg.batch_size * cfg.grad_accum)


def decay_names(model: nn.Module) -> set[str]:
    """Parameters weight decay applies to: the Trainer's rule (no biases, no norms)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def make_optimizer(model: nn.Module, trainable: dict[str, nn.Parameter], cfg: Any):
    """AdamW over the trainable parameters (two groups: decayed and not), constant schedule."""
    decayed = decay_names(model)
    groups = [
        {
            "params": [p for n, p in trainable.items() if n in decayed],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for n, p in trainable.items() if n not in decayed], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


# ---- epoch checkpoints (safetensors + JSON, never pickle) -----------------------------------


def param_order(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(
    folder: Path, key: str, trainable: dict[str, nn.Parameter], optimizer, history: History
) -> None:
    """Trainable tensors and AdamW state to safetensors, the rest to JSON; each renamed in."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PARAM + n: p.detach().to("cpu").contiguous() for n, p in trainable.items()}
    index = {id(p): i for i, p in enumerate(param_order(optimizer))}
    scalars: dict[str, dict[str, Any]] = {}
    for param, state in optimizer.state.items():
        i = index[id(param)]
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM}{i}:{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(i), {})[name] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    for g, group in zip(groups, optimizer.param_groups, strict=True):
        g["params"] = [index[id(p)] for p in group["params"]]
    epoch = str(history.epochs_done)
    atomic(folder / CHECKPOINT_TENSORS, lambda p: save_file(tensors, p, {"epoch": epoch}))
    state = {"key": key, "history": asdict(history), "param_groups": groups, "scalars": scalars}
    atomic(folder / CHECKPOINT_STATE, lambda p: Path(p).write_text(json.dumps(state, indent=1)))


def atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def load_checkpoint(
    folder: Path, key: str, trainable: dict[str, nn.Parameter], optimizer
) -> History | None:
    """The history of a matching epoch checkpoint, its tensors loaded in place; else None."""
    state_path, tensor_path = folder / CHECKPOINT_STATE, folder / CHECKPOINT_TENSORS
    if not (state_path.is_file() and tensor_path.is_file()):
        return None
    state = json.loads(state_path.read_text())
    history = History(**state["history"])
    with safe_open(str(tensor_path), framework="pt") as f:
        metadata = f.metadata() or {}
        if state.get("key") != key or metadata.get("epoch") != str(history.epochs_done):
            log.warning(
                "Ignoring the epoch checkpoint in %s: it belongs to another configuration or "
                "was cut short; fine-tuning starts from the first epoch.",
                folder,
            )
            return None
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[PARAM + name])
    optim_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIM):
            _, i, stat = name.split(":", 2)
            optim_state.setdefault(int(i), {})[stat] = value
    for i, values in state["scalars"].items():
        optim_state.setdefault(int(i), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    return history


def save_best(folder: Path, trainable: dict[str, nn.Parameter], epoch: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable.items()}
    atomic(folder / BEST_TENSORS, lambda p: save_file(tensors, p, {"epoch": str(epoch)}))


def load_best(folder: Path, trainable: dict[str, nn.Parameter]) -> None:
    with safe_open(str(folder / BEST_TENSORS), framework="pt") as f, torch.no_grad():
        for name, param in trainable.items():
            param.copy_(f.get_tensor(name))


def epoch_done(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (a seam: tests interrupt the run here)."""


# ---- the Trainer ------------------------------------------------------------------------------


def make_trainer_class():
    from transformers import Trainer

    class OrderedTrainer(Trainer):
        """The Trainer, reading its training blocks in the order they were given."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

    return OrderedTrainer


def make_progress_callback(history: History, step_offset: int, total: int, epoch: int):
    from transformers import TrainerCallback

    class LossCallback(TrainerCallback):
        """Per-step training loss into the history, and a progress bar with the running loss."""

        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=f"fine-tune epoch {epoch + 1}", unit="step")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.steps.append(step_offset + state.global_step)
                history.train_loss.append(float(logs["loss"]))
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return LossCallback()


def training_arguments(cfg: Any, out_dir: Path, device: torch.device, bf16: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir / CHECKPOINT_DIR / "trainer"),
        num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def use_bf16(cfg: Any, device: torch.device) -> bool:
    """bf16 mixed precision on a GPU that has it, fp32 on the CPU (unless ``finetune.bf16``)."""
    if cfg.bf16 is not None:
        return bool(cfg.bf16)
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def train(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    train_set: BlockSet,
    eval_set: BlockSet,
    cfg: Any,
    out_dir: Path,
    device: torch.device,
    key: str,
) -> History:
    """Train ``trainable`` (named as in ``model``) for ``cfg.epochs`` epochs, resuming if it can.

    Returns the history; the model holds the best epoch's weights when ``cfg.keep_best``.
    """
    folder = out_dir / CHECKPOINT_DIR
    optimizer, scheduler = make_optimizer(model, trainable, cfg)
    history = load_checkpoint(folder, key, trainable, optimizer)
    if history is None:
        history = History()
    else:
        history.resumed_from_epoch = history.epochs_done
        log.info("Resuming fine-tuning after epoch %d from %s", history.epochs_done, folder)
    bf16 = use_bf16(cfg, device)
    args = training_arguments(cfg, out_dir, device, bf16)
    trainer_cls = make_trainer_class()
    n_used = blocks_per_epoch(train_set.blocks.shape[0], cfg)
    steps = math.ceil(n_used / (cfg.batch_size * cfg.grad_accum))
    eval_data = BlockDataset(eval_set.blocks)
    for epoch in range(history.epochs_done, cfg.epochs):
        start = time.perf_counter()
        order = epoch_order(train_set.blocks.shape[0], cfg.data_seed, epoch)[:n_used]
        callback = make_progress_callback(history, epoch * steps, steps, epoch)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=BlockDataset(train_set.blocks[order]),
            eval_dataset=eval_data,
            optimizers=(optimizer, scheduler),
            callbacks=[callback],
        )
        model.train()
        trainer.train()
        eval_loss = float(trainer.evaluate()["eval_loss"])
        history.eval_loss.append(eval_loss)
        history.epochs_done = epoch + 1
        history.tokens_seen += n_used * train_set.blocks.shape[1]
        history.train_wall_s += time.perf_counter() - start
        log.info("fine-tune epoch %d: eval loss %.4f", epoch + 1, eval_loss)
        if history.best_epoch is None or eval_loss < history.eval_loss[history.best_epoch - 1]:
            history.best_epoch = epoch + 1
            if cfg.keep_best:
                save_best(folder, trainable, epoch + 1)
        save_checkpoint(folder, key, trainable, optimizer, history)
        epoch_done(epoch + 1)
    if cfg.keep_best and history.best_epoch != history.epochs_done:
        load_best(folder, trainable)
        log.info("Keeping epoch %d, the best by evaluation loss", history.best_epoch)
    model.eval()
    return history


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Process peak RSS (and CUDA peak allocation on a GPU) in MB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
