"""Replaying a module of a layer from the cached input of its last projection.

The layer-by-layer refit (``methods/update.py::refit_sequential``) runs each decoder layer once
per input it refits: up to the attention output (o's input), then up to the MLP input, the MLP
hidden state and finally to the end to propagate. Once q/k/v are refit, everything before o is
fixed, so the later calls need not recompute q/k/v and the attention: the attention module's
output is o(x_o) on the x_o recorded in the o-input pass. Likewise, once up/gate are refit, the
MLP module's output is down(x_down) on the x_down recorded in the down-input pass, so the
propagation needs no up/gate. ``OutputReplay`` records such a module's last projection's input per
batch and, inside ``replaying(b)``, replaces the module's ``forward`` by one returning
``proj(x[b])`` (with the current projection, so a refit one is seen), packed like the module's own
output.

Exactness is checked, not assumed: while recording, each batch's ``proj(x)`` must equal (bit for
bit) what the module returned; a family whose attention or MLP does anything after that projection
(or calls it twice) fails the check and the layer is run in full as before. Once the projection
itself is refit, ``freeze`` replaces each x by proj(x), so the later calls of the layer run no
matmul of that module. The recorded inputs (then outputs) cost one more copy of the hidden states
per batch (for x_down, d_ff / d_model copies until it is frozen), on the runner's
``hidden_device``, for the layer being refit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from basis_sharing.runtime.placement import module_device
from basis_sharing.runtime.sequential import LayerCall, call_layer, forwards_replaced


class _Recorded(Exception):
    """Raised by the module's forward hook: the recording call needs nothing after it."""


def _split(output: Any) -> tuple[torch.Tensor, tuple | None]:
    """(the module output's first element, the rest; None: the output is a tensor)."""
    return (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)


def _pack(first: torch.Tensor, rest: tuple | None) -> Any:
    """A module output like the recorded one, ``first`` in the place of its first element."""
    return first if rest is None else (first, *rest)


class OutputReplay:
    """The outputs of one module of one layer, batch by batch, replayed from the cached input of
    the projection that produces them.

    Args:
        module: the module whose output is ``projection``'s (the attention for o, the MLP for
            down).
        projection: the last projection inside it (called at replay time: its current weights
            count).
        store: where the recorded inputs wait (the runner's ``hidden_device``).
    """

    def __init__(self, module: nn.Module, projection: nn.Module, store: torch.device) -> None:
        self.module = module
        self.projection = projection
        self.store = store
        self.inputs: list[torch.Tensor] = []
        self.rests: list[tuple | None] = []  # per batch, what the output holds after its first
        self.outputs: list[torch.Tensor] | None = None  # proj(x) per batch, once frozen
        self.exact = True

    @property
    def ready(self) -> bool:
        """Every batch recorded so far replays exactly (at least one recorded)."""
        return self.exact and bool(self.inputs or self.outputs)

    def record(self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Run ``layer`` to the end of the module on one batch; what the projection read is
        returned and kept, with what the module's output holds besides the projection's."""
        seen: list[torch.Tensor] = []
        outputs: list[Any] = []

        def pre_hook(_module: nn.Module, args: tuple) -> None:
            seen.append(args[0].detach())

        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            outputs.append(output)
            raise _Recorded

        handles = [
            self.projection.register_forward_pre_hook(pre_hook),
            self.module.register_forward_hook(hook),
        ]
        try:
            call_layer(layer, hidden, call)
        except _Recorded:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            raise RuntimeError("the replayed projection was not called by the layer")
        x = seen[0]
        # Once a batch failed, the layer runs in full: no later batch needs checking.
        self.exact = (
            self.exact
            and len(seen) == 1
            and len(outputs) == 1
            and torch.equal(self.projection(x), _split(outputs[0])[0])
        )
        if self.exact:
            self.inputs.append(x.to(self.store))
            self.rests.append(_split(outputs[0])[1])
        return x

    def freeze(self) -> None:
        """The projection is final (refit): compute proj(x) once per batch and replay that from
        now on, in place of x; the later calls then run no matmul of the module."""
        if not self.ready:
            raise RuntimeError("nothing to freeze: no batch was recorded exactly")
        device = module_device(self.projection)
        self.outputs = [self.projection(x.to(device)).to(self.store) for x in self.inputs]
        self.inputs = []

    @contextmanager
    def replaying(self, batch: int) -> Iterator[None]:
        """Inside: the module returns proj(x) of ``batch`` instead of computing (with the current
        projection, or the outputs ``freeze`` computed)."""
        if not self.ready:
            raise RuntimeError("nothing to replay: no batch was recorded exactly")
        rest = self.rests[batch]
        frozen = None if self.outputs is None else self.outputs[batch]
        x = self.inputs[batch] if frozen is None else None

        def forward(*_args: Any, **_kwargs: Any) -> Any:
            device = module_device(self.projection)
            first = self.projection(x.to(device)) if frozen is None else frozen.to(device)
            return _pack(first, rest)

        with forwards_replaced([self.module], lambda _index: forward):
            yield


def parent_of(layer: nn.Module, path: str) -> nn.Module | None:
    """The module holding the projection at ``path`` inside ``layer`` (None: the layer itself,
    where there is no attention or MLP module to replay)."""
    head, _, _ = path.rpartition(".")
    return layer.get_submodule(head) if head else None
