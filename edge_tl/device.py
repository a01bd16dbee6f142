"""Where frozen-trunk passes run: the CPU, or a CUDA GPU when PyTorch sees one.

The passes that dominate fine-tuning and evaluation (feature caching, predictions) only read the
trunk, so they can run on a GPU (a Jetson's, or a workstation's) while everything that trains or
is saved stays on the CPU: a module goes to the device for one pass and comes back after it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from edge_tl.distributed import local_rank
from edge_tl.errors import BackendUnavailableError, ConfigError

DEVICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU if PyTorch sees one, else the CPU; ``cpu``; ``cuda`` (a GPU is required).
    Under torchrun a GPU is the rank's own, ``cuda:LOCAL_RANK``."""
    if name not in DEVICES:
        raise ConfigError(f"device {name!r} is not one of {', '.join(DEVICES)}; use --device auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "--device cuda: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use --device cpu, or install a CUDA build of PyTorch on a machine with an NVIDIA GPU"
        )
    index = local_rank() or 0
    if index >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"torchrun local rank {index} has no GPU of its own: PyTorch sees {torch.cuda.device_count()}; "
            f"start at most {torch.cuda.device_count()} processes per node (--nproc-per-node), or use --device cpu")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda (GPU name)``, for run manifests."""
    return "cpu" if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})"


def _move(module: nn.Module, device: torch.device) -> None:
    # Outside inference mode even when called inside it: parameters copied under inference mode
    # become inference tensors, which a later load_state_dict or training step cannot update.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device)


@contextmanager
def placed(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` for the block, back on the CPU after it (also when the block raises)."""
    if device.type == "cpu":
        yield module
        return
    _move(module, device)
    try:
        yield module
    finally:
        _move(module, CPU)
