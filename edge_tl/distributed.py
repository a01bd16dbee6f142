"""Data-parallel runs under torchrun: the process group, shards of the image records, in-order gathers.

``torchrun --nproc-per-node N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and the rendezvous address) in their environment. Inside :func:`process_group`
the frozen-trunk passes (:mod:`edge_tl.features`) give each rank a contiguous shard of the images
(:func:`shard_bounds`) and gather the outputs back in record order (:func:`gather_in_order`), so
every rank holds what one process computes; the trainable tail trains with DistributedDataParallel
(:mod:`edge_tl.tail`). Rank 0 alone writes files (:func:`is_main_process`).

Outside torchrun (or with one rank) every query answers as a single process does: rank 0 of 1,
one shard holding everything, a gather that returns its input. The bottom layer: torch only.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TypeVar, cast

import torch
import torch.distributed as dist

from edge_tl.errors import BackendUnavailableError, ConfigError, EdgeTLError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")
TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


def _int_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; start the command with "
                          "torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK for one process") from None


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process as one of several ranks, else None.

    None when none of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` is set or the world has one rank; a partial or
    inconsistent set is a :class:`~edge_tl.errors.ConfigError`.
    """
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"torchrun environment incomplete: {', '.join(present)} set but {', '.join(missing)} not; "
                          "start the command with torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK")
    rank, world, local = (_int_variable(name) for name in TORCHRUN_VARIABLES)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"torchrun environment inconsistent: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                          "(need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0); start the command with torchrun")
    return None if world == 1 else (rank, world, local)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun started it; (0, 1) outside torchrun."""
    environment = torchrun_environment()
    return (0, 1) if environment is None else environment[:2]


def local_rank() -> int | None:
    """The rank's index on its machine (its GPU) under torchrun; None outside torchrun."""
    environment = torchrun_environment()
    return None if environment is None else environment[2]


def is_main_process() -> bool:
    """True for the process that writes files: rank 0, or the only process."""
    return process_rank()[0] == 0


def is_active() -> bool:
    """A process group of more than one rank is up: passes shard and gather, the tail trains with DDP."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_rank() -> tuple[int, int]:
    """(rank, world size) in the active process group; (0, 1) when none is up."""
    return (dist.get_rank(), dist.get_world_size()) if is_active() else (0, 1)


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Under torchrun, the default process group for the block (gloo for the CPU, NCCL for ``device`` a CUDA
    GPU, which becomes the rank's current GPU), destroyed after it; yields (rank, world size). Outside
    torchrun, or when a group is up already (a caller's), it starts nothing."""
    environment = torchrun_environment()
    if environment is None or (dist.is_available() and dist.is_initialized()):
        yield group_rank()
        return
    rank, world, _ = environment
    if not dist.is_available():
        raise BackendUnavailableError(f"torchrun started rank {rank} of {world} but this PyTorch build has no "
                                      "torch.distributed; run one process, or install a PyTorch with it")
    missing = [name for name in RENDEZVOUS_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"torchrun environment incomplete: {', '.join(missing)} unset; start the command with "
                          "torchrun (e.g. torchrun --standalone --nproc-per-node 2 -m edge_tl ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    elif not dist.is_gloo_available():
        raise BackendUnavailableError(f"torchrun rank {rank}: this PyTorch build has no gloo backend for CPU runs; "
                                      "run one process, or install a PyTorch built with gloo")
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendUnavailableError(f"torchrun rank {rank} of {world}: cannot start the {backend} process group "
                                      f"({reason}); check MASTER_ADDR/MASTER_PORT and that every rank started") from err
    log.info("rank %d of %d: %s process group on %s", rank, world, backend, device)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def shard_bounds(count: int, rank: int, world: int, granule: int = 1) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``count`` items, in whole granules of
    ``granule`` items (the last may be short): granule counts differ by at most one, earlier ranks first.
    Concatenated in rank order the shards are ``range(count)``."""
    if count < 0 or world < 1 or not 0 <= rank < world or granule < 1:
        raise ValueError(f"shard_bounds({count}, {rank}, {world}, {granule})")
    units = -(-count // granule)
    per, extra = divmod(units, world)
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(count, first * granule), min(count, last * granule)


def local_shard(count: int, granule: int = 1) -> tuple[int, int]:
    """This rank's :func:`shard_bounds` in the active process group; ``(0, count)`` when none is up."""
    rank, world = group_rank()
    return shard_bounds(count, rank, world, granule)


def _transport_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_in_order(part: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """Every rank's ``part`` concatenated along ``dim`` in rank order, on every rank (on ``part``'s device).
    ``None``: this rank's shard is empty (its shape is unknown to it). Without an active group, ``part``.

    Parts are padded to the longest along ``dim`` for ``all_gather`` and trimmed after; they travel as
    their raw bytes, so any dtype arrives bit-identical (gloo refuses some dtypes, e.g. int16).
    """
    if not is_active():
        if part is None:
            raise ValueError("gather_in_order: nothing to gather")
        return part
    described = None if part is None else (tuple(part.shape), part.dtype, str(part.device))
    descriptions: list = [None] * dist.get_world_size()
    dist.all_gather_object(descriptions, described)
    reference = next((item for item in descriptions if item is not None), None)
    if reference is None:
        raise ValueError("gather_in_order: every rank's shard is empty")
    shape, dtype, _ = reference
    dim = dim % len(shape)
    lengths = [0 if item is None else item[0][dim] for item in descriptions]
    for item in descriptions:
        if item is not None and (item[1] != dtype or item[0][:dim] + item[0][dim + 1:] != shape[:dim] + shape[dim + 1:]):
            raise ValueError(f"gather_in_order: parts of shapes/dtypes {descriptions} do not concatenate along {dim}")
    longest = max(lengths)
    padded_shape = shape[:dim] + (longest,) + shape[dim + 1:]
    transport = _transport_device()
    padded = torch.zeros(padded_shape, dtype=dtype, device=transport)
    if part is not None and part.shape[dim]:
        padded.narrow(dim, 0, part.shape[dim]).copy_(part)
    payload = padded.contiguous().reshape(-1).view(torch.uint8)
    received = [torch.empty_like(payload) for _ in lengths]
    dist.all_gather(received, payload)
    pieces = [raw.view(dtype).reshape(padded_shape).narrow(dim, 0, length) for raw, length in zip(received, lengths)]
    out_device = part.device if part is not None else torch.device(reference[2])
    return torch.cat(pieces, dim).to(out_device)


def sum_over_ranks(value: float) -> float:
    """The sum of ``value`` over the ranks of the active group (``value`` itself without one), in float64."""
    if not is_active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_transport_device())
    dist.all_reduce(total)
    return float(total.item())


def from_first_rank(values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (unchanged without an active group): decisions that must agree
    (early stopping) follow rank 0, so round-off between ranks can never split the group."""
    if not is_active():
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=_transport_device())
    dist.broadcast(shared, 0)
    return [float(value) for value in shared.cpu()]


def checked_on_every_rank(check: Callable[[], T]) -> T:
    """``check()`` on every rank, then one outcome for all: if it raised an EdgeTLError on any rank, every
    rank raises the first such error (same class and message), so no rank waits for one that gave up.
    Without an active group, just ``check()``."""
    if not is_active():
        return check()
    try:
        value, failure = check(), None
    except EdgeTLError as err:
        value, failure = None, err
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if failure is None else (type(failure), str(failure)))
    first = next((rank for rank, item in enumerate(failures) if item is not None), None)
    if first is None:
        return cast(T, value)
    if failure is not None and first == dist.get_rank():
        raise failure
    kind, message = failures[first]
    raise kind(message)
