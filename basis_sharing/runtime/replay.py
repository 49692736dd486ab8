"""Replaying a layer's attention from the cached input of its output projection.

The layer-by-layer refit (``methods/update.py::refit_sequential``) runs each decoder layer once
per input it refits: up to the attention output (o's input), then up to the MLP input, the MLP
hidden state and finally to the end to propagate. Once q/k/v are refit, everything before o is
fixed, so the later calls need not recompute q/k/v and the attention: the attention module's
output is o(x_o) on the x_o recorded in the o-input pass. ``AttentionReplay`` records x_o per batch
and, inside ``replaying(b)``, replaces the attention module's ``forward`` by one returning
``o(x_o[b])`` (with the current o, so a refit o is seen), packed like the module's own output.

Exactness is checked, not assumed: while recording, each batch's ``o(x_o)`` (what o returned in
that call, caught by a forward hook, so the check costs no matmul) must equal (bit for bit) what
the attention module returned; a family whose attention does anything after o (or
calls it twice) fails the check and the layer is run in full as before. Once o itself is refit,
``freeze`` replaces each x_o by o(x_o), so the later calls of the layer run no attention matmul.
x_o (then o(x_o)) costs one more copy of the hidden states per batch, on the runner's
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
    """Raised by the attention's forward hook: the recording call needs nothing after it."""


def _split(output: Any) -> tuple[torch.Tensor, tuple | None]:
    """(the attention output's first element, the rest; None: the output is a tensor)."""
    return (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)


def _pack(first: torch.Tensor, rest: tuple | None) -> Any:
    """An attention output like the recorded one, ``first`` in the place of its first element."""
    return first if rest is None else (first, *rest)


class AttentionReplay:
    """The attention outputs of one layer, batch by batch, replayed from o's cached input.

    Args:
        attention: the module whose output is o's output (the parent of the o projection).
        o: the output projection inside it (called at replay time: its current weights count).
        store: where the recorded x_o wait (the runner's ``hidden_device``).
    """

    def __init__(self, attention: nn.Module, o: nn.Module, store: torch.device) -> None:
        self.attention = attention
        self.o = o
        self.store = store
        self.inputs: list[torch.Tensor] = []
        self.rests: list[tuple | None] = []  # per batch, what the output holds after its first
        self.outputs: list[torch.Tensor] | None = None  # o(x_o) per batch, once frozen
        self.exact = True

    @property
    def ready(self) -> bool:
        """Every batch recorded so far replays exactly (at least one recorded)."""
        return self.exact and bool(self.inputs or self.outputs)

    def record(self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Run ``layer`` to the end of its attention on one batch; x_o (what o read) is returned
        and kept, with what the attention's output holds besides o's output."""
        seen: list[torch.Tensor] = []
        produced: list[torch.Tensor] = []  # what o returned in that call
        outputs: list[Any] = []

        def o_hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # A copy: what o read, even if the attention wrote into its input afterwards.
            seen.append(args[0].detach().clone())
            produced.append(output.detach())

        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            outputs.append(output)
            raise _Recorded

        handles = [
            self.o.register_forward_hook(o_hook),
            self.attention.register_forward_hook(hook),
        ]
        try:
            call_layer(layer, hidden, call)
        except _Recorded:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            raise RuntimeError("the output projection was not called by the layer")
        x = seen[0]
        # Once a batch failed, the layer runs in full: no later batch needs checking.
        self.exact = (
            self.exact
            and len(seen) == 1
            and len(outputs) == 1
            and torch.equal(produced[0], _split(outputs[0])[0])
        )
        if self.exact:
            self.inputs.append(x.to(self.store))
            self.rests.append(_split(outputs[0])[1])
        return x

    def freeze(self) -> None:
        """o is final (refit): compute o(x_o) once per batch and replay that from now on, in
        place of x_o (the same memory); the later calls then run no attention matmul at all."""
        if not self.ready:
            raise RuntimeError("nothing to freeze: no batch was recorded exactly")
        device = module_device(self.o)
        self.outputs = [self.o(x.to(device)).to(self.store) for x in self.inputs]
        self.inputs = []

    @contextmanager
    def replaying(self, batch: int) -> Iterator[None]:
        """Inside: the attention module returns o(x_o) of ``batch`` instead of computing
        (with the current o, or the outputs ``freeze`` computed)."""
        if not self.ready:
            raise RuntimeError("nothing to replay: no batch was recorded exactly")
        rest = self.rests[batch]
        frozen = None if self.outputs is None else self.outputs[batch]
        x = self.inputs[batch] if frozen is None else None

        def forward(*_args: Any, **_kwargs: Any) -> Any:
            device = module_device(self.o)
            first = self.o(x.to(device)) if frozen is None else frozen.to(device)
            return _pack(first, rest)

        with forwards_replaced([self.attention], lambda _index: forward):
            yield


def attention_of(layer: nn.Module, path: str) -> nn.Module | None:
    """The module holding the projection at ``path`` inside ``layer`` (None: the layer itself,
    where there is no attention module to replay)."""
    head, _, _ = path.rpartition(".")
    return layer.get_submodule(head) if head else None
