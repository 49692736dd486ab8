"""Block-by-block execution: one decoder block (or a few) on the device at a time.

A model larger than the device can still be calibrated, compressed, refit and evaluated if only
one block is there at a time (GPTQ's sequential loop, docs/architecture.md §2). A pass of the
``BlockRunner`` over a list of token batches has three steps:

1. **Capture.** The model's outer part (embeddings, rotary tables, final norm, head: everything in
   no decoder block) goes to the device and the model runs with every decoder layer's ``forward``
   replaced by a recorder. Recorder i keeps what layer i receives besides the hidden states: the
   mask, position ids or embeddings, whatever the family passes, positionally (GPT-2's mask) or by
   keyword, and per layer, since layers can differ (Gemma-2 alternates sliding-window and full
   masks); recorder 0 also keeps the hidden states. The last one stops the forward. No block runs
   and none moves.
2. **Blocks.** For each unit (one layer, or consecutive layers that must be on the device
   together, e.g. a group sharing a basis) the unit moves to the device and is handed to the
   consumer as a ``Block`` with its inputs. The consumer may run it with hooks (statistics), refit
   or replace its modules (SVD-LLM's update, later trained methods); then the unit's outputs are
   computed on the block as it is now (unless the consumer kept outputs) and become the next
   unit's inputs, and the unit goes back where it came from.
3. **Head.** After the last unit, ``logits(i)`` replays batch i through the model's own forward with
   every layer replaced by a stub that hands back the final hidden states, so the final norm, the
   LM head and any soft-capping are the model's own code.

Between units the hidden states of every batch live on ``hidden_device`` (the CPU by default; the
device itself with ``runtime.hidden_states=device``). Nothing here builds a graph: the runner's own
computations run under ``torch.no_grad()``; a consumer is free to train inside its block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from basis_sharing.models.families import FamilyAdapter
from basis_sharing.runtime.placement import OuterPart, module_device, move_block


@dataclass
class LayerCall:
    """What one decoder layer receives besides its hidden states."""

    args: tuple  # positional arguments after the hidden states (GPT-2 passes its mask so)
    kwargs: dict[str, Any]


@dataclass
class BatchState:
    """One token batch inside a pass: the current block's input and every layer's call.

    Attributes:
        hidden: (batch, seq, d) hidden states entering the next unit, on the runner's
            ``hidden_device``.
        calls: one ``LayerCall`` per decoder layer (tensors shared between layers stored once).
    """

    hidden: torch.Tensor
    calls: list[LayerCall]


class _Stop(Exception):
    """Raised by the last recorder: the capture needs nothing past the last layer's input."""


_ABSENT = object()


@contextmanager
def forwards_replaced(
    layers: Sequence[nn.Module], make: Callable[[int], Callable[..., Any]]
) -> Iterator[None]:
    """Every layer's ``forward`` is ``make(index)`` inside the block, its own again after it."""
    saved = [layer.__dict__.get("forward", _ABSENT) for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            if old is _ABSENT:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old


def split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    """(hidden states, the rest of the call) of one decoder-layer call."""
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], LayerCall((), rest)


def moved(value: Any, device: torch.device, memo: dict[int, tuple[Any, Any]]) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) on ``device``.

    ``memo`` maps a tensor's id to (tensor, moved copy), so a tensor shared by several layers'
    calls is moved, and stored, once.
    """
    if isinstance(value, torch.Tensor):
        hit = memo.get(id(value))
        if hit is None or hit[0] is not value:
            hit = memo[id(value)] = (value, value.to(device))
        return hit[1]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(moved(v, device, memo) for v in value)
    if isinstance(value, list):
        return [moved(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: moved(v, device, memo) for k, v in value.items()}
    return value


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """One decoder layer on one batch, as ``Block.forward`` calls it."""
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Captured(Exception):
    """Raised by a capture hook to end a layer call once its input was read."""


def capture_input(
    layer: nn.Module, module: nn.Module, hidden: torch.Tensor, call: LayerCall, stop: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the input of ``module`` inside ``layer`` on this batch, the layer's output or None).

    ``stop``: the call ends at ``module`` (nothing after it is computed); else the layer runs to
    its end and its output is returned too.
    """
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        if seen:
            raise RuntimeError("the captured input was read twice in one call")
        seen.append(args[0].detach())
        if stop:
            raise _Captured

    handle = module.register_forward_pre_hook(hook)
    out = None
    try:
        out = call_layer(layer, hidden, call)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the captured module was not called by the layer")
    return seen[0], out


def token_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """(n, seq) ids as consecutive batches of at most ``batch_size`` rows."""
    return [ids[start : start + batch_size] for start in range(0, ids.shape[0], batch_size)]


def layer_units(n_layers: int, size: int = 1) -> list[tuple[int, ...]]:
    """Consecutive layers in units of ``size`` (the last may be shorter): (0, 1), (2, 3), ..."""
    if size < 1:
        raise ValueError(f"unit size must be >= 1, got {size}")
    return [tuple(range(s, min(s + size, n_layers))) for s in range(0, n_layers, size)]


def check_units(units: Sequence[Sequence[int]], n_layers: int) -> list[tuple[int, ...]]:
    """The units as tuples; they must cover 0..n_layers-1 once, in order, each consecutive."""
    flat = [i for unit in units for i in unit]
    if any(len(unit) == 0 for unit in units) or flat != list(range(n_layers)):
        raise ValueError(
            f"units must split the {n_layers} decoder layers into consecutive runs in order, "
            f"got {[list(u) for u in units]}"
        )
    return [tuple(unit) for unit in units]


class BlockRunner:
    """Runs a model block by block on ``device`` while its weights stay where they are.

    With the weights on the CPU (``runtime=sequential``) only the outer part and one unit are on
    the device at a time. With the whole model already on the device (``runtime=full``) every move
    is a no-op, so the same consumers (SVD-LLM's layer-by-layer update) run either way.

    Args:
        model: a causal LM of ``family``.
        device: where each block runs.
        hidden_device: where the hidden states wait between blocks (default: the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        family: FamilyAdapter,
        device: torch.device | str,
        hidden_device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.family = family
        self.device = torch.device(device)
        self.hidden_device = torch.device(hidden_device or "cpu")

    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.model)

    @contextmanager
    def open(self, batches: Sequence[torch.Tensor], desc: str = "blocks") -> Iterator[Pass]:
        """A pass over ``batches`` (each (batch, seq) token ids), their inputs captured.

        Inside, the model is in eval mode and its outer part on the device; both are restored on
        exit, also when the consumer fails.
        """
        layers = list(self.layers())
        outer = OuterPart(self.model, layers)
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        outer.to(self.device)
        try:
            yield Pass(self, list(batches), desc)
        finally:
            outer.restore()
            for module, mode in modes:
                module.training = mode


class Pass:
    """One pass of token batches through the model, block by block (see the module docstring)."""

    def __init__(self, runner: BlockRunner, batches: list[torch.Tensor], desc: str) -> None:
        if not batches:
            raise ValueError("a pass needs at least one token batch")
        self.runner = runner
        self.batches = batches
        self.desc = desc
        self.n_layers = len(runner.layers())
        self.states = [self._capture(ids) for ids in batches]
        self.done = 0  # layers whose outputs the states hold

    # ---- 1. capture ------------------------------------------------------------------------
    def _capture(self, ids: torch.Tensor) -> BatchState:
        runner, last = self.runner, self.n_layers - 1
        store, memo = runner.hidden_device, {}
        calls: list[LayerCall | None] = [None] * self.n_layers
        first: list[torch.Tensor] = []

        def recorder(index: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden, call = split_hidden(args, kwargs)
                if index == 0:
                    kept = hidden.to(store)
                    first.append(kept.clone() if kept is hidden else kept)
                calls[index] = LayerCall(
                    moved(call.args, store, memo), moved(call.kwargs, store, memo)
                )
                if index == last:
                    raise _Stop
                return hidden

            return forward

        with forwards_replaced(runner.layers(), recorder), torch.no_grad():
            try:
                runner.model(input_ids=ids.to(runner.device), use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError("the forward pass never reached the last decoder layer")
        missing = [i for i, call in enumerate(calls) if call is None]
        if missing:
            raise RuntimeError(f"the forward pass skipped decoder layers {missing}")
        return BatchState(first[0], calls)

    # ---- 2. blocks -------------------------------------------------------------------------
    def blocks(self, units: Sequence[Sequence[int]] | None = None) -> Iterator[Block]:
        """Each unit on the device with its inputs; afterwards its outputs feed the next one.

        Args:
            units: consecutive layer runs covering every layer in order; default one layer each.
        """
        if self.done:
            raise RuntimeError("this pass has already been run through its blocks")
        units = check_units(units or layer_units(self.n_layers), self.n_layers)
        for unit in tqdm(units, desc=self.desc, unit="block", leave=False):
            layers = self.runner.layers()
            homes = [module_device(layers[i]) for i in unit]
            for i in unit:
                move_block(layers[i], self.runner.device)
            block = Block(self, unit)
            try:
                yield block
                outputs = block.outputs if block.outputs is not None else block.run(True)
                for state, out in zip(self.states, outputs, strict=True):
                    state.hidden = out
                self.done = unit[-1] + 1
            finally:
                layers = self.runner.layers()  # the consumer may have replaced a layer
                for i, home in zip(unit, homes, strict=True):
                    move_block(layers[i], home)

    # ---- 3. head ---------------------------------------------------------------------------
    def logits(self, index: int) -> torch.Tensor:
        """(batch, seq, vocab) logits of batch ``index`` from the final hidden states."""
        if self.done != self.n_layers:
            raise RuntimeError("logits need every block run first (iterate blocks())")
        runner, last = self.runner, self.n_layers - 1
        final = self.states[index].hidden.to(runner.device)

        def stub(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                return final if i == last else split_hidden(args, kwargs)[0]

            return forward

        with forwards_replaced(runner.layers(), stub), torch.no_grad():
            ids = self.batches[index].to(runner.device)
            return runner.model(input_ids=ids, use_cache=False).logits


class Block:
    """One unit of consecutive decoder layers on the device, with the inputs of every batch.

    A consumer may attach hooks and ``run()`` it (any number of times), modify its modules in
    place, or ``replace`` a layer. What propagates to the next unit is ``outputs``: the ones kept
    by ``run(keep_outputs=True)`` if the consumer kept any, else those of the block as it is when
    the consumer hands it back. (A consumer that modifies the block after keeping outputs and
    wants the modified outputs to propagate calls ``discard_outputs()`` or runs it again.)
    """

    def __init__(self, session: Pass, layers: tuple[int, ...]) -> None:
        self.session = session
        self.layers = layers  # decoder layer indices, consecutive
        self.outputs: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.session.runner.device

    @property
    def modules(self) -> list[nn.Module]:
        """The unit's decoder layers (on the device while the block is handed out)."""
        layers = self.session.runner.layers()
        return [layers[i] for i in self.layers]

    @property
    def states(self) -> list[BatchState]:
        """Per batch: the unit's input hidden states and every layer's call (do not modify)."""
        return self.session.states

    def inputs(self) -> Iterator[tuple[torch.Tensor, dict[int, LayerCall]]]:
        """Per batch: the unit's input hidden states and its layers' calls, on the device."""
        for state in self.session.states:
            memo: dict[int, tuple[Any, Any]] = {}
            calls = {
                i: LayerCall(
                    moved(state.calls[i].args, self.device, memo),
                    moved(state.calls[i].kwargs, self.device, memo),
                )
                for i in self.layers
            }
            yield state.hidden.to(self.device), calls

    def forward(self, hidden: torch.Tensor, calls: dict[int, LayerCall]) -> torch.Tensor:
        """The unit's layers on one batch (under the caller's grad mode)."""
        modules = self.modules
        for position, i in enumerate(self.layers):
            out = modules[position](hidden, *calls[i].args, **calls[i].kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def run(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Every batch through the unit (no graph); with ``keep_outputs`` its outputs propagate."""
        store = self.session.runner.hidden_device
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            for hidden, calls in self.inputs():
                out = self.forward(hidden, calls)
                if keep_outputs:
                    outputs.append(out.to(store))
        if not keep_outputs:
            return None
        self.outputs = outputs
        return outputs

    def discard_outputs(self) -> None:
        self.outputs = None

    def replace(self, layer: int, module: nn.Module) -> None:
        """Put ``module`` in place of decoder layer ``layer`` of this unit (moved to the device)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this block {self.layers}")
        move_block(module, self.device)
        self.session.runner.layers()[layer] = module
