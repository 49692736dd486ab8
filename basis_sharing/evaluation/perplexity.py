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
import torch.nn.functional as F
from tqdm.auto import tqdm

from basis_sharing.errors import BadDataError

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


def _batches(bounds: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch."""
    batches: list[list[tuple[int, int]]] = []
    for b in bounds:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0]) == (b[1] - b[0]):
            last.append(b)
        else:
            batches.append([b])
    return batches


def window_nlls(
    model,
    ids: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int = 1,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL of each window, in float64.

    Args:
        model: a causal LM whose forward(input_ids=...) returns ``.logits`` (batch, len, vocab).
        ids: (n_tokens,) token ids.
        bounds: windows as [start, end) pairs, each at least 2 tokens long.
        batch_size: windows per forward pass.

    Returns:
        (len(bounds),) float64.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    batches = _batches(bounds, batch_size)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            x = torch.stack([ids[s:e] for s, e in batch]).to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            if logits.dtype != torch.float64:  # half-precision logits are scored in fp32
                logits = logits.float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), -1)
            out.append(nll.double().mean(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


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
) -> PerplexityResult:
    """Paper-protocol perplexity of ``model`` on the token ids of one joined split.

    Args:
        ids: (n_tokens,) ids of the whole split, tokenized once.
        context_length: window length (2048 for the paper's models, 1024 for GPT-2).
        max_windows: evaluate only the first windows (a quick run); recorded as ``truncated``.

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
    nlls = window_nlls(model, ids, selected, batch_size, desc=f"ppl {dataset}".strip())
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
