"""Numbers at a fixed precision per kind (shared by the renderers and the ranking notes).

Reported values are shown as printed in the paper; reproduced ones one digit finer for
accuracies (the paper's two decimals would hide differences of up to 0.005).
"""

from __future__ import annotations

import math

DECIMALS = {"acc": 3, "ratio": 4, "speedup": 2, "params": 2, "seconds": 2}


def format_value(value: float, kind: str, *, signed: bool = False) -> str:
    """``value`` for a cell of ``kind``; perplexities span 5 to 10^8, so their format scales."""
    if not math.isfinite(value):
        return str(value)
    sign = "+" if signed else ""
    if kind in DECIMALS:
        decimals = DECIMALS[kind]
        if kind in ("params", "seconds") and abs(value) >= 1000:
            decimals = 0
    elif abs(value) < 1000:
        decimals = 2
    elif abs(value) < 1e6:
        decimals = 0
    else:
        return f"{value:{sign}.2e}"
    value = round(value, decimals) + 0.0  # no "-0.00"
    text = f"{value:{sign}.{decimals}f}"
    return text + "x" if kind == "speedup" else text
