"""The inputs of every decoder layer's MLP on the calibration tokens (FiPS, docs/methods.md §9.4).

FiPS trains each compressed MLP to reproduce the original MLP's outputs on the original MLP's
inputs. The hook on the MLP's first projection (the one reading the MLP input: up for LLaMA-like
families, c_fc for GPT-2) stores every token's input row, in float32 on the CPU; the matching
outputs are the original MLP applied to them, which the method computes from the dense weights it
still holds (storing them as well would double a cache that is already the largest one:
n_tokens x d x 4 bytes per layer, 2.3 GB for SmolLM2-135M on 64 x 512 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from basis_sharing.calibration.cache import Fields, Tensors, stats_key
from basis_sharing.calibration.statistics import (
    Accumulator,
    ForwardStatistic,
    Key,
    register_statistic,
)
from basis_sharing.models.families import MLP_IN, FamilyAdapter
from basis_sharing.runtime.distributed import World

STREAM = MLP_IN
STAT = "mlp_inputs"


@dataclass
class MLPInputs:
    """layer -> (n_tokens, d) float32 CPU tensor of the MLP's inputs, in calibration order."""

    inputs: dict[int, torch.Tensor]
    tokens: int

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.inputs.values())


class RowsAccumulator:
    """Keeps every row it is fed (flattened over batch and sequence), on the CPU in float32."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        self.rows.append(rows.clone())  # clone: an ordinary tensor, not an inference one
        self.tokens += rows.shape[0]

    def to(self, device: torch.device | str) -> None:
        """Rows are already on the CPU; nothing to move."""

    def reduce(self, world: World) -> None:
        """Every rank's rows, in rank order: the calibration order, as shards are contiguous."""
        if not self.rows:
            raise RuntimeError("a rows accumulator that saw no batch cannot be reduced")
        self.rows = [world.concat_rows(torch.cat(self.rows))]
        self.tokens = self.rows[0].shape[0]


@register_statistic
class MLPInputStatistic(ForwardStatistic):
    """Every MLP input row of the calibration pass."""

    name = "mlp_inputs"
    stat = STAT
    data_parallel = True  # rows concatenated in calibration order

    def key(
        self, identity: dict[str, Any], calibration_hash: str, gram_dtype: str, batch_size: int
    ) -> str:
        # Stored in float32 whatever the Gram dtype; the rows do not depend on the batching.
        return stats_key(identity, calibration_hash, "float32", stat=STAT)

    def streams(self, family: FamilyAdapter) -> dict[str, str]:
        readers = family.kinds_by_input().get(MLP_IN)
        if not readers:
            raise ValueError(f"family {family.name} has no projection reading the MLP input")
        return {STREAM: readers[0]}

    def accumulator(self, gram_dtype: str, store: str | None = None) -> Accumulator:
        return RowsAccumulator()

    def assemble(
        self, accumulators: dict[Key, Accumulator], batches: int, gram_dtype: str
    ) -> MLPInputs:
        inputs = {layer: torch.cat(acc.rows) for (layer, _), acc in accumulators.items()}
        counts = {x.shape[0] for x in inputs.values()}
        if len(counts) != 1:
            raise RuntimeError(f"MLP hooks saw different token counts: {sorted(counts)}")
        return MLPInputs(inputs=inputs, tokens=counts.pop())

    def encode(self, value: MLPInputs) -> tuple[Tensors, Fields]:
        tensors = {f"L{layer}": x.contiguous() for layer, x in sorted(value.inputs.items())}
        return tensors, {"tokens": value.tokens}

    def decode(self, tensors: Tensors, fields: Fields) -> MLPInputs:
        inputs = {int(name[1:]): x for name, x in tensors.items()}
        bad = [n for n, x in tensors.items() if x.ndim != 2 or x.shape[0] != fields["tokens"]]
        if bad:
            raise ValueError(f"MLP input tensors {bad} are not (tokens, d)")
        return MLPInputs(inputs=inputs, tokens=int(fields["tokens"]))

    def describe(self, value: MLPInputs) -> str:
        return (
            f"Collected the MLP inputs of {len(value.inputs)} layers x {value.tokens} tokens "
            f"({value.nbytes() / 2**20:.1f} MiB)."
        )
