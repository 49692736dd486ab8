"""The one typed state a run's stages read and fill (docs/architecture.md §1.1).

Each stage takes the ``RunState``, reads what earlier stages put there and sets its own fields;
nothing travels through string-keyed dictionaries. A field is None until the stage that owns it
has run, which the stage list's order guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from basis_sharing.data.corpora import Corpus
from basis_sharing.evaluation.zeroshot import TaskSource
from basis_sharing.finetune.registry import Finetuner
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.methods.registry import CompressionMethod
from basis_sharing.models.families import FamilyAdapter
from basis_sharing.models.loading import ModelSource
from basis_sharing.runtime.distributed import SINGLE, World
from basis_sharing.tracking.record import RunRecord


@dataclass(frozen=True)
class Plan:
    """What validation resolved before any work: the method, the fine-tuner, the device."""

    method: CompressionMethod
    device: torch.device
    finetuner: Finetuner | None = None  # None: finetune=none, no finetune stage


@dataclass
class Corpora:
    """The texts a run reads, loaded (and checked) before the model."""

    evals: dict[str, Corpus]  # perplexity datasets by name
    calibration: Corpus | None = None  # when the method needs calibration data
    throughput: Corpus | None = None  # when eval.throughput.enabled
    zeroshot: list[TaskSource] = field(default_factory=list)


@dataclass
class EvalInputs:
    """Everything the evaluation stages read, tokenized before the model is loaded."""

    ppl_ids: dict[str, torch.Tensor]
    speed_blocks: torch.Tensor | None = None
    speed_prompt: torch.Tensor | None = None


@dataclass
class RunState:
    """A run in progress: its settings, its record and what each stage produced so far."""

    cfg: DictConfig
    plan: Plan
    record: RunRecord
    caches: SweepCaches  # reused across the jobs of a sweep; owned by whoever runs the jobs
    world: World = SINGLE  # the ranks of a torchrun launch; they calibrate together
    corpora: Corpora | None = None  # data
    source: ModelSource | None = None  # model_source: where the base model's files are
    saved: Path | None = None  # model_source (load flow): the saved compressed model
    tokenizer: Any = None  # model_source
    inputs: EvalInputs | None = None  # tokenize
    calibration_ids: torch.Tensor | None = None  # tokenize: (n_samples, seq_len)
    model: nn.Module | None = None  # load_model; compressed in place by compress
    family: FamilyAdapter | None = None  # load_model
    dense_weights: int | None = None  # load_model: projection weights of the dense model
    # load_model: (kinds, their dense weights) when the method's ratio covers some kinds only
    budget: tuple[tuple[str, ...], int] | None = None
    stats: dict[str, Any] | None = None  # calibrate: statistics by name
    stats_key: str | None = None  # calibrate: key of the whole calibration setup
    # calibrate, with model.calib_batch_size=auto: the batch size chosen and why
    calib_batch_size: int | None = None
    batch_choice: dict[str, Any] | None = None


@dataclass(frozen=True)
class Stage:
    """One step of the run, recorded under ``name`` in results.json's ``stages``."""

    name: str
    run: Callable[[RunState], None]
    on_device: bool = False  # its peak device memory is recorded too
    # Under torchrun: every rank runs it (the setup the shared stages need) ...
    all_ranks: bool = False
    # ... or the ranks compute it together (the calibration). The other stages are rank 0's.
    shared: bool = False
