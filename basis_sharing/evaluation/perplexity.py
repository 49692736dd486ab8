"""Perplexity with the Basis Sharing paper's protocol (docs/methods.md §7.1).

The test split's rows are joined with "\\n\\n" and tokenized once; the ids are cut into
non-overlapping windows of the model's context length, the last partial window included. Each
window's loss is the mean next-token NLL over its own tokens (its first token is context only), and

    PPL = exp(mean over windows of the window mean NLL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from basis_sharing.errors import BadDataError

# The forward pass over windows lives in the runtime, below the methods (ASVD scores windows
# too); re-exported here with the protocol.
from basis_sharing.runtime.sequential import BlockRunner
from basis_sharing.runtime.windows import window_nlls

# Evaluation split of each perplexity dataset, and how many rows the protocol uses (C4: the first
# 2000 validation documents, as SVD-LLM and Basis Sharing do).
PPL_SPLITS: dict[str, tuple[str, int | None]] = {
    "wikitext2": ("test", None),
    "ptb": ("test", None),
    "c4": ("validation", 2000),
}


def window_bounds(n_tokens: int, context_length: int) -> list[tuple[int, int]]:
    """[start, end) of each non-overlapping window; the last one may be shorter."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    return [(s, min(s + context_length, n_tokens)) for s in range(0, n_tokens, context_length)]


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    mean_nll: float
    context_length: int
    n_tokens: int  # tokens in the joined split
    n_windows: int  # windows in the full protocol (a 1-token tail has no target and is not one)
    n_windows_evaluated: int
    n_targets: int  # tokens predicted in the evaluated windows
    truncated: bool  # True when max_windows stopped early: not the paper number
    nonfinite_windows: int  # windows whose NLL was inf/nan (counted, never dropped)

    def as_dict(self) -> dict:
        return asdict(self)


def _exp(mean_nll: float) -> float:
    """exp(mean NLL); NaN stays NaN, overflow is inf (a broken model must not look fine)."""
    if math.isnan(mean_nll):
        return float("nan")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


def perplexity(
    model,
    ids: torch.Tensor,
    context_length: int,
    dataset: str = "",
    batch_size: int = 1,
    max_windows: int | None = None,
    runner: BlockRunner | None = None,
) -> PerplexityResult:
    """Paper-protocol perplexity of ``model`` on the token ids of one joined split.

    Args:
        ids: (n_tokens,) ids of the whole split, tokenized once.
        context_length: window length (2048 for the paper's models, 1024 for GPT-2).
        max_windows: evaluate only the first windows (a quick run); recorded as ``truncated``.
        runner: score block by block with it (``runtime=sequential``: the same numbers for a
            model larger than the device); None: the whole model where it is.

    Raises:
        BadDataError: fewer than 2 ids, so no window has a token to predict (the mean over no
            windows would be a NaN that looks like a result).
    """
    bounds = [b for b in window_bounds(ids.numel(), context_length) if b[1] - b[0] >= 2]
    if not bounds:
        raise BadDataError(
            f"Perplexity{f' on {dataset}' if dataset else ''}: {ids.numel()} token(s) give no "
            "window with a token to predict (at least 2 are needed)."
        )
    selected = bounds if max_windows is None else bounds[:max_windows]
    nlls = window_nlls(
        model, ids, selected, batch_size, desc=f"ppl {dataset}".strip(), runner=runner
    )
    finite = torch.isfinite(nlls)
    mean_nll = float(nlls.mean()) if len(nlls) else float("nan")
    return PerplexityResult(
        dataset=dataset,
        ppl=_exp(mean_nll),
        mean_nll=mean_nll,
        context_length=context_length,
        n_tokens=int(ids.numel()),
        n_windows=len(bounds),
        n_windows_evaluated=len(selected),
        n_targets=sum(e - s - 1 for s, e in selected),
        truncated=len(selected) < len(bounds),
        nonfinite_windows=int((~finite).sum()),
    )
