"""Which install profile this is: the light device side, or the training side (``[train]``).

The device install (``pip install edge-tl``) has no torch, torchvision, timm or NNI; a training
command run there must say, in one line, what to install instead of failing with an ImportError
deep inside. NNI 3.0 ships an x86-64 wheel only, so on aarch64 even ``[train]`` lacks it: pruning
and quantization (and the chains that use them) need an x86-64 machine.
"""
from __future__ import annotations

import importlib.util

from edge_tl.errors import BackendUnavailableError

TRAINING_MODULES = ("torch", "torchvision", "timm")
COMPRESSION_MODULES = ("nni",)


def importable(module: str) -> bool:
    """Whether ``module`` can be found (a blocked or broken package counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [module for module in modules if not importable(module)]


def require_training_side(command: str, compression: bool = False) -> None:
    """Raise BackendUnavailableError naming the extra to install unless ``command`` can run here."""
    missing = missing_modules(TRAINING_MODULES)
    if missing:
        raise BackendUnavailableError(
            f"`edge-tl {command}` is on the training side and needs {', '.join(missing)}, which this device install "
            "lacks; pip install 'edge-tl[train]' on the workstation (the device runs export MODEL.onnx, verify --pack, "
            "bench, predict and report)"
        )
    if compression and missing_modules(COMPRESSION_MODULES):
        raise BackendUnavailableError(
            f"`edge-tl {command}` needs NNI 3.0, which is not installed (it ships for x86-64 only); pip install "
            "'edge-tl[train]' on an x86-64 workstation"
        )
