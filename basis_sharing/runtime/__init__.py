"""Running a model over token data: the forward passes that calibration, methods and evaluation
share (below the methods, so a method may measure the model it is compressing).

``runtime=full`` runs the whole model where it is; ``runtime=sequential`` keeps the weights on the
CPU and runs one decoder block at a time on the device (``sequential.BlockRunner``). Under
``torchrun`` the calibration pass is split over the processes (``distributed``). Importing the
package registers the ``runtime`` group's schemas (``options``).
"""

from basis_sharing.runtime.distributed import SINGLE, World
from basis_sharing.runtime.options import (
    FULL,
    HIDDEN_STATES,
    RUNTIMES,
    SEQUENTIAL,
    check_runtime,
    hidden_device,
    make_runner,
    weight_device,
)
from basis_sharing.runtime.sequential import Block, BlockRunner, LayerCall, Pass, layer_units

__all__ = [
    "FULL",
    "HIDDEN_STATES",
    "RUNTIMES",
    "SEQUENTIAL",
    "SINGLE",
    "Block",
    "BlockRunner",
    "LayerCall",
    "Pass",
    "World",
    "check_runtime",
    "hidden_device",
    "layer_units",
    "make_runner",
    "weight_device",
]
