"""Where a model's tensors live while it runs block by block.

A decoder block's tensors are its own parameters and buffers plus the ones its compressed
projections compute with but do not own (a basis shared by a layer group lives once in
``model.shared_bases``, docs/methods.md §3.8): moving a block moves both. Everything that is in no
block (embeddings, the final norm, the LM head, rotary tables) is the model's *outer* part, which
stays on the device for a whole pass. Parameters are moved in place (``param.data``), so tied
weights stay tied and every module keeps referring to the same ``nn.Parameter``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from basis_sharing.modules.base import CompressedLinear


def borrowed_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Parameters a block computes with but does not own (a group's shared basis)."""
    own = {id(p) for p in block.parameters()}
    borrowed: dict[int, nn.Parameter] = {}
    for module in block.modules():
        if isinstance(module, CompressedLinear):
            for tensor in module.factor_weights():
                if isinstance(tensor, nn.Parameter) and id(tensor) not in own:
                    borrowed[id(tensor)] = tensor
    return list(borrowed.values())


def move_parameters(params: Iterable[nn.Parameter], device: torch.device) -> None:
    """Move each parameter's data in place (the Parameter object, hence any tie, is kept)."""
    for param in params:
        if param.device != device:
            param.data = param.data.to(device)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for an empty one."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def move_block(block: nn.Module, device: torch.device) -> None:
    """``block`` and the shared tensors it borrows, to ``device``."""
    block.to(device)
    move_parameters(borrowed_parameters(block), device)


class OuterPart:
    """The tensors of a model that belong to no decoder block, with their home devices.

    ``to(device)`` moves them (the embeddings, final norm, head, rotary buffers); ``restore()`` puts
    each back where it was.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module]) -> None:
        inside = {id(m) for block in blocks for m in block.modules()}
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        in_blocks |= {id(p) for block in blocks for p in borrowed_parameters(block)}
        self._params: dict[int, nn.Parameter] = {}
        self._buffers: list[tuple[nn.Module, str]] = []
        for module in _outside(model, inside):
            for param in module._parameters.values():
                if param is not None and id(param) not in in_blocks:
                    self._params[id(param)] = param
            self._buffers += [(module, n) for n, b in module._buffers.items() if b is not None]
        self._homes = {key: p.device for key, p in self._params.items()}
        self._buffer_homes = [module._buffers[name].device for module, name in self._buffers]

    def to(self, device: torch.device) -> None:
        move_parameters(self._params.values(), device)
        for module, name in self._buffers:
            module._buffers[name] = module._buffers[name].to(device)

    def restore(self) -> None:
        for key, param in self._params.items():
            move_parameters([param], self._homes[key])
        for (module, name), home in zip(self._buffers, self._buffer_homes, strict=True):
            module._buffers[name] = module._buffers[name].to(home)


def _outside(root: nn.Module, inside: set[int]) -> list[nn.Module]:
    """``root`` and its descendants, skipping every subtree whose root is in ``inside``."""
    found: list[nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in inside:
            continue
        found.append(module)
        stack.extend(module.children())
    return found
