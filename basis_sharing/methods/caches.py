"""In-memory results that the jobs of one sweep share, in one object with an owner.

Lifetime: one process, which is the jobs of a Hydra basic-launcher sweep. The entry point
(``run.py``) creates one ``SweepCaches`` per process and hands it to every job's
``pipeline.run``; a ``pipeline.run`` called without one gets a fresh one that lives for that job
only. The pipeline passes it to the method through ``CompressionContext.caches``; a context
without it (a method called directly) computes everything afresh. Nothing is kept in module
globals, so two owners (two benchmarks in one process, two tests) never see each other's entries,
and dropping the object frees everything it holds.

Entries are keyed by the calibration statistics' key (``stats_key``) plus the method's settings
that change the result, so a key never matches a different setup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from basis_sharing.linalg.factorization import Decomposition

# ASVD's sensitivity table: (layer, kind) -> {candidate kept fraction: calibration perplexity}.
SensitivityTable = dict[tuple[int, str], dict[float, float]]


class DecompositionCache:
    """Ratio-independent SVDs kept in memory (on the CPU) across the jobs of a sweep.

    A ratio sweep shares the process, so each group is scaled and decomposed once and only
    truncated per ratio. Least recently used entries are dropped beyond the budget.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, Decomposition] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self, key: tuple, compute: Callable[[], Decomposition], budget_mb: float
    ) -> Decomposition:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        if budget_mb > 0:
            self._entries[key] = value.to("cpu")
            while sum(v.nbytes() for v in self._entries.values()) > budget_mb * 2**20:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop the entries; the hit and miss counters keep counting."""
        self._entries.clear()


@dataclass
class SweepCaches:
    """Everything a method may reuse across the jobs of a sweep (see the module docstring)."""

    decompositions: DecompositionCache = field(default_factory=DecompositionCache)
    # ASVD's per-projection perplexities do not depend on the target ratio.
    sensitivity: dict[tuple, SensitivityTable] = field(default_factory=dict)

    def clear(self) -> None:
        self.decompositions.clear()
        self.sensitivity.clear()
