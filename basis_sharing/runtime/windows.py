"""Mean next-token NLL of token windows: one forward pass per batch of equal-length windows.

The perplexity protocol (which windows, how they are averaged) is the evaluation's; this is the
forward pass it and ASVD's sensitivity search both run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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
    batches = window_batches(bounds, batch_size)
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
