"""Training and evaluation blocks for fine-tuning after compression (docs/methods.md §6.3).

A split's rows are joined with "\\n\\n" and tokenized once (as for calibration, §2.1), then cut
into consecutive non-overlapping blocks of ``block_len`` tokens; the remainder is dropped. When
training and evaluation read the same split (the offline mirror has no WikiText-2 train split),
the last blocks are held out for evaluation and never trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from basis_sharing.data.corpora import (
    PREPARE_HINT,
    Corpus,
    find_mirror_file,
    get_corpus_spec,
    split_source,
)
from basis_sharing.errors import BadDataError, DataNotFoundError
from basis_sharing.hub import hub_available


def cut_blocks(ids: torch.Tensor, block_len: int) -> torch.Tensor:
    """Consecutive non-overlapping blocks of ``ids``.

    Args:
        ids: (n_tokens,) token ids.
    Returns:
        (n_tokens // block_len, block_len) int64 blocks; the remainder is dropped.
    """
    n_blocks = ids.numel() // block_len
    return ids[: n_blocks * block_len].reshape(n_blocks, block_len).clone()


@dataclass
class BlockSet:
    """Blocks of one split, and where they came from (the record's ``finetune.data``)."""

    blocks: torch.Tensor  # (n_blocks, block_len) int64
    corpus: Corpus
    first_block: int  # index of blocks[0] among all blocks of the split

    def provenance(self) -> dict[str, Any]:
        return {
            **self.corpus.provenance(),
            "blocks": int(self.blocks.shape[0]),
            "block_len": int(self.blocks.shape[1]),
            "first_block": self.first_block,
            "tokens": int(self.blocks.numel()),
        }


def split_blocks(
    train: tuple[Corpus, torch.Tensor],
    evaluation: tuple[Corpus, torch.Tensor],
    block_len: int,
    holdout_fraction: float,
    max_eval_blocks: int | None = None,
) -> tuple[BlockSet, BlockSet]:
    """Training and evaluation blocks from the (corpus, token ids) of each split.

    When both are the same split, the last ``ceil(holdout_fraction * n)`` blocks (at least one)
    are the evaluation blocks and the ones before them the training blocks.

    Raises:
        BadDataError: a split gives no block of ``block_len`` tokens, or holding out leaves no
            training block; says how many tokens it holds.
    """
    (train_corpus, train_ids), (eval_corpus, eval_ids) = train, evaluation
    train_blocks = cut_blocks(train_ids, block_len)
    require_blocks(train_corpus, train_blocks, train_ids, block_len, 1)
    same = (train_corpus.name, train_corpus.split) == (eval_corpus.name, eval_corpus.split)
    if same:
        n = train_blocks.shape[0]
        held = max(1, math.ceil(n * holdout_fraction))
        require_blocks(train_corpus, train_blocks, train_ids, block_len, held + 1)
        eval_set = BlockSet(train_blocks[n - held :], eval_corpus, n - held)
        train_set = BlockSet(train_blocks[: n - held], train_corpus, 0)
    else:
        eval_blocks = cut_blocks(eval_ids, block_len)
        require_blocks(eval_corpus, eval_blocks, eval_ids, block_len, 1)
        eval_set = BlockSet(eval_blocks, eval_corpus, 0)
        train_set = BlockSet(train_blocks, train_corpus, 0)
    if max_eval_blocks is not None:
        eval_set.blocks = eval_set.blocks[:max_eval_blocks]
    return train_set, eval_set


def require_blocks(
    corpus: Corpus, blocks: torch.Tensor, ids: torch.Tensor, block_len: int, needed: int
) -> None:
    if blocks.shape[0] < needed:
        raise BadDataError(
            f"{corpus.describe()} holds {ids.numel()} tokens, i.e. {blocks.shape[0]} block(s) of "
            f"finetune.block_len={block_len}, but fine-tuning needs at least {needed} (with the "
            "held-out evaluation blocks). Use a shorter finetune.block_len or a larger split."
        )


def check_split_available(
    dataset: str, split: str, data_dir: str | Path, offline: bool, setting: str
) -> None:
    """Refuse, before any model is loaded, a split neither in the mirror nor downloadable.

    Raises:
        ConfigError: unknown dataset or split (the message lists the valid ones).
        DataNotFoundError: names the mirror file expected and the command that provides it.
    """
    source = split_source(dataset, split)
    if find_mirror_file(data_dir, dataset, split) is not None or hub_available(offline):
        return
    spec = get_corpus_spec(dataset)
    expected = Path(data_dir).expanduser() / source.mirror_files[0]
    raise DataNotFoundError(
        f"{setting}: {spec.title} split '{split}' is not in the data mirror (expected {expected}) "
        "and the Hugging Face hub is unreachable (or offline=true). "
        + PREPARE_HINT.format(data_dir=data_dir)
    )
