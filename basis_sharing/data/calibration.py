"""The canonical calibration sampler (docs/methods.md §2.1: one tokenization pass).

The split's rows are joined with "\\n\\n" and tokenized once, cut into consecutive non-overlapping
blocks of ``seq_len`` tokens (the remainder is dropped), and ``torch.randperm`` seeded with
``seed`` picks ``n_samples`` of them.
"""

from __future__ import annotations

import torch

from basis_sharing.errors import CalibrationError


def count_blocks(n_tokens: int, seq_len: int) -> int:
    return n_tokens // seq_len


def sample_calibration_blocks(
    ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, source: str = "the split"
) -> torch.Tensor:
    """Pick ``n_samples`` random non-overlapping blocks of ``ids``.

    Args:
        ids: (n_tokens,) token ids of the joined split.
        n_samples: blocks to return.
        seq_len: tokens per block.
        seed: the permutation equals ``torch.manual_seed(seed); torch.randperm(n_blocks)``.
        source: how to name the split in an error message.

    Returns:
        (n_samples, seq_len) int64 block ids, in the order the permutation chose them.

    Raises:
        CalibrationError: the split holds fewer than ``n_samples`` blocks (or none: shorter than
            one block); says how many tokens and blocks it holds.
    """
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(
            f"calibration.n_samples ({n_samples}) and calibration.seq_len ({seq_len}) must be >= 1."
        )
    n_blocks = count_blocks(ids.numel(), seq_len)
    if n_blocks == 0:
        raise CalibrationError(
            f"{source} holds {ids.numel()} tokens, fewer than one calibration block of "
            f"calibration.seq_len={seq_len} tokens, so no calibration sample can be cut from it. "
            "Use a larger calibration split or a shorter calibration.seq_len."
        )
    if n_samples > n_blocks:
        raise CalibrationError(
            f"Asked for {n_samples} calibration samples of {seq_len} tokens, but {source} holds "
            f"{ids.numel()} tokens, i.e. only {n_blocks} non-overlapping blocks of {seq_len}. "
            f"Set calibration.n_samples<={n_blocks}, a shorter calibration.seq_len, "
            "or a larger split."
        )
    blocks = ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_blocks, generator=generator)[:n_samples]
    return blocks[chosen].clone()
