"""Mean next-token NLL of token windows: one forward pass per batch of equal-length windows.

The perplexity protocol (which windows, how they are averaged) is the evaluation's; this is the
forward pass it and ASVD's sensitivity search both run, on the whole model or, given a
``BlockRunner``, block by block (every window's hidden states wait between blocks, so a model
larger than the device can be scored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from basis_sharing.runtime.sequential import BlockRunner


def window_batches(bounds: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch."""
    batches: list[list[tuple[int, int]]] = []
    for b in bounds:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0]) == (b[1] - b[0]):
            last.append(b)
        else:
            batches.append([b])
    return batches


def batch_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row of ``x``: (batch, len) ids, logits (batch, len, vocab).

    Returns (batch,) float64 on the CPU; half-precision logits are scored in float32.
    """
    logits = logits[:, :-1]
    if logits.dtype != torch.float64:
        logits = logits.float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    ).view(x.shape[0], -1)
    return nll.double().mean(dim=1).cpu()


def window_nlls(
    model,
    ids: torch.Tensor,
    bounds: list[tuple[int, int]],
    batch_size: int = 1,
    desc: str = "perplexity",
    runner: BlockRunner | None = None,
) -> torch.Tensor:
    """Mean next-token NLL of each window, in float64.

    Args:
        model: a causal LM whose forward(input_ids=...) returns ``.logits`` (batch, len, vocab).
        ids: (n_tokens,) token ids.
        bounds: windows as [start, end) pairs, each at least 2 tokens long.
        batch_size: windows per forward pass.
        runner: run ``model`` block by block with it (the same numbers, one block on the device
            at a time); None: the whole model where it is.

    Returns:
        (len(bounds),) float64.
    """
    batches = window_batches(bounds, batch_size)
    if not batches:
        return torch.empty(0, dtype=torch.float64)
    if runner is not None:
        return _window_nlls_by_block(runner, ids, batches, desc)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            x = torch.stack([ids[s:e] for s, e in batch]).to(device)
            out.append(batch_nll(model(input_ids=x, use_cache=False).logits, x))
    return torch.cat(out)


def _window_nlls_by_block(
    runner: BlockRunner, ids: torch.Tensor, batches: list[list[tuple[int, int]]], desc: str
) -> torch.Tensor:
    inputs = [torch.stack([ids[s:e] for s, e in batch]) for batch in batches]
    out: list[torch.Tensor] = []
    with runner.open(inputs, desc=f"{desc}: blocks") as session:
        for _ in session.blocks():
            pass  # nothing to do inside a block: its outputs propagate
        with torch.inference_mode():
            for index, x in enumerate(tqdm(inputs, desc=desc, unit="batch", leave=False)):
                logits = session.logits(index)
                out.append(batch_nll(logits, x.to(logits.device)))
    return torch.cat(out)
