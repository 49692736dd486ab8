"""Data-parallel calibration over ``torch.distributed``: ``torchrun --nproc_per_node=N run.py``.

torchrun starts N copies of the run and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``init`` reads it and, when
there is more than one process, joins the process group (NCCL for a CUDA run, Gloo on the CPU,
or ``runtime.distributed_backend``) and puts a CUDA rank on GPU ``LOCAL_RANK``. Without those
variables (or with ``WORLD_SIZE=1``) nothing is initialised and every helper is the identity, so a
single process computes exactly what it did before this module existed.

The calibration pass is what is split (``calibration.statistics``): each rank runs the hooked
forward pass over its ``shard`` of the calibration samples, then every accumulator is reduced
across the ranks with the collectives below (sums, maxima, rows concatenated in rank order), so
each rank holds the statistics of all samples. Shards are contiguous blocks of whole calibration
batches: every rank sees exactly the batches the single process would, which keeps the statistics
that depend on the batching (ASVD's sum of batch means, FWSVD's per-batch squared gradients)
exact, and leaves only the order of the cross-rank sum different from a single process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from basis_sharing.errors import ConfigError, unknown_choice

log = logging.getLogger(__name__)

AUTO, GLOO, NCCL = "auto", "gloo", "nccl"
BACKENDS = (AUTO, GLOO, NCCL)  # runtime.distributed_backend
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for each process
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")  # where rank 0 listens (env:// initialisation)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run.

    Attributes:
        rank: this process's rank, 0 .. size - 1 (0 is the main rank).
        size: number of processes; 1 means no process group (every collective is the identity).
        local_rank: its rank on this machine (which GPU it uses).
        backend: "gloo" or "nccl"; None for a single process.
        device: where this rank computes (``cuda:<local_rank>`` on CUDA, else the run's device).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: it reads and writes the caches, compresses, evaluates and writes the record."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where a tensor must be for a collective: the rank's GPU for NCCL, else the CPU."""
        return self.device if self.backend == NCCL else torch.device("cpu")

    def shard(self, calibration_ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """This rank's rows of ``calibration_ids``: (n_samples, seq_len) -> (n_rank, seq_len).

        One process gets ``calibration_ids`` itself. See ``shard_bounds`` for the split.
        """
        if self.size == 1:
            return calibration_ids
        start, stop = shard_bounds(calibration_ids.shape[0], self.size, batch_size)[self.rank]
        return calibration_ids[start:stop]

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced elementwise over every rank ("sum" or "max"), in place.

        A tensor that is not on ``comm_device`` (a CPU Gram under NCCL) travels there and back.
        """
        if self.size == 1:
            return tensor
        if op not in _OPS:
            raise unknown_choice("reduction", op, list(_OPS))
        buffer = tensor if tensor.device == self.comm_device else tensor.to(self.comm_device)
        dist.all_reduce(buffer, op=_OPS[op])
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def sum_ints(self, *values: int) -> list[int]:
        """Each of ``values`` summed over every rank (one collective for all of them)."""
        if self.size == 1:
            return list(values)
        counts = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return [int(v) for v in counts.tolist()]

    def concat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows``: (n_r, ...) concatenated in rank order: (sum_r n_r, ...).

        Contiguous shards make rank order the calibration order. Each rank's block is broadcast
        from its owner in turn, so the tensors travel unchanged (no arithmetic).
        """
        if self.size == 1:
            return rows
        counts = [0] * self.size
        counts[self.rank] = rows.shape[0]
        counts = self.sum_ints(*counts)
        blocks = []
        for owner, count in enumerate(counts):
            if owner == self.rank:
                block = rows.to(self.comm_device)
            else:
                block = torch.empty(
                    (count, *rows.shape[1:]), dtype=rows.dtype, device=self.comm_device
                )
            dist.broadcast(block, src=owner)
            blocks.append(block.to(rows.device))
        return torch.cat(blocks)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank: how a decision rank 0 made is shared."""
        if self.size == 1:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.backend}, {self.device})"


SINGLE = World()  # one process: no process group
_current: World | None = None  # what ``init`` set up (None: nothing yet)
_owned = False  # whether ``init`` created the process group (and ``shutdown`` may destroy it)


def shard_bounds(n_samples: int, size: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of each rank's rows: contiguous blocks of whole batches of ``batch_size``.

    The ceil(n_samples / batch_size) batches (the last may be short) are dealt in order, the
    first ``n_batches % size`` ranks getting one more, so every sample is used exactly once and
    each rank runs the very batches a single process would.

    Raises:
        ConfigError: fewer batches than ranks (a rank would have nothing to compute).
    """
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size}.")
    n_batches = -(-n_samples // batch_size)
    if n_batches < size:
        raise ConfigError(
            f"{n_samples} calibration samples in batches of {batch_size} make {n_batches} "
            f"batch(es), fewer than the {size} processes of this data-parallel run (each rank "
            f"needs at least one batch). Use calibration.n_samples >= {size * batch_size}, a "
            f"smaller model.calib_batch_size, or fewer processes (--nproc_per_node)."
        )
    base, extra = divmod(n_batches, size)
    bounds, start = [], 0
    for rank in range(size):
        stop = min(n_samples, start + (base + (rank < extra)) * batch_size)
        bounds.append((start, stop))
        start = stop
    return bounds


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) when they are unset.

    Raises:
        ConfigError: a variable that is not an integer, a rank outside 0 .. size - 1, or
            ``WORLD_SIZE`` > 1 without ``RANK``.
    """
    env = os.environ if env is None else env
    values: dict[str, int] = {}
    for name in ENV:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer (set by torchrun).") from None
    size = values.get("WORLD_SIZE", 1)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} must be >= 1.")
    if size > 1 and "RANK" not in values:
        raise ConfigError(
            f"WORLD_SIZE={size} is set but RANK is not: launch data-parallel runs with "
            "torchrun (torchrun --nproc_per_node=N run.py ...), which sets both."
        )
    rank = values.get("RANK", 0)
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside 0 .. WORLD_SIZE-1 = {size - 1}.")
    return rank, size, values.get("LOCAL_RANK", rank)


def resolve_backend(name: str, device: torch.device) -> str:
    """The process group's backend: "auto" is NCCL for a CUDA run and Gloo otherwise.

    Raises:
        ConfigError: an unknown name, or NCCL for a run that is not on CUDA.
    """
    if name not in BACKENDS:
        raise unknown_choice("runtime.distributed_backend", name, BACKENDS)
    backend = (NCCL if device.type == "cuda" else GLOO) if name == AUTO else name
    if backend == NCCL and device.type != "cuda":
        raise ConfigError(
            f"runtime.distributed_backend=nccl needs a CUDA run, but device is {device}; use "
            "runtime.distributed_backend=gloo (or auto) on the CPU."
        )
    return backend


def init(device: torch.device | str, backend: str = AUTO) -> World:
    """This process's ``World``, joining the process group when torchrun started several.

    Idempotent: the jobs of a ``-m`` sweep run in one process and share one group. A group that
    someone else initialised (a test harness, a notebook) is adopted as it is.

    Args:
        device: the run's device (``preflight.resolve_device``); a CUDA rank moves to
            ``cuda:<LOCAL_RANK>``.
        backend: ``runtime.distributed_backend``: auto, gloo or nccl.

    Raises:
        ConfigError: bad launch variables, an unusable backend, a GPU index given on the command
            line, too few GPUs for the local ranks, or a group already joined with another backend.
    """
    global _current, _owned
    device = torch.device(device)
    rank, size, local_rank = launch_env()
    joined = dist.is_available() and dist.is_initialized()
    if joined:  # adopt it; LOCAL_RANK (if set) still says which GPU
        local_rank = local_rank if rank == dist.get_rank() else dist.get_rank()
        rank, size = dist.get_rank(), dist.get_world_size()
    if size == 1:
        return SINGLE if device == SINGLE.device else World(device=device)
    chosen = resolve_backend(backend, device)
    if joined:
        running = str(dist.get_backend())
        if (backend != AUTO and running != chosen) or (running == NCCL and device.type != "cuda"):
            raise ConfigError(
                f"runtime.distributed_backend={backend} on {device}, but this process already "
                f"joined a {running} process group; one process keeps one backend."
            )
        chosen = running
    device = rank_device(device, local_rank)
    if _current is not None and _current.backend == chosen and _current.device == device:
        return _current
    if not joined:
        missing = [name for name in RENDEZVOUS if not os.environ.get(name)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={size} is set but {', '.join(missing)} is not: launch data-parallel "
                "runs with torchrun, which sets where rank 0 listens."
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # env://: under torchrun this joins the agent's store at MASTER_ADDR:MASTER_PORT.
        dist.init_process_group(backend=chosen, init_method="env://", rank=rank, world_size=size)
        _owned = True
    _current = World(rank, size, local_rank, chosen, device)
    log.info("Data-parallel calibration: %s.", _current.describe())
    return _current


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Where a rank computes: ``cuda:<local_rank>`` for a CUDA run, else ``device`` itself.

    Raises:
        ConfigError: a CUDA index given explicitly (each rank takes its own GPU), or fewer
            visible GPUs than local ranks.
    """
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"device={device} names one GPU, but a data-parallel run puts each rank on its own "
            "GPU (cuda:LOCAL_RANK); use device=cuda or device=auto with torchrun."
        )
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} needs GPU cuda:{local_rank}, but only {visible} GPU(s) are "
            "visible: use --nproc_per_node <= the GPUs of each machine."
        )
    return torch.device("cuda", local_rank)


def world() -> World:
    """The ``World`` ``init`` set up; one process (``SINGLE``) before that."""
    return _current if _current is not None else SINGLE


def is_main() -> bool:
    """Whether this process is rank 0 (always true for a single process)."""
    return world().is_main


def shard(calibration_ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """This process's rows of ``calibration_ids`` (``World.shard`` of the current world)."""
    return world().shard(calibration_ids, batch_size)


def launch_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (1 without torchrun)."""
    return launch_env(env)[1]


def shutdown() -> None:
    """Leave the process group ``init`` created (the end of the process); then one process."""
    global _current, _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _current, _owned = None, False
