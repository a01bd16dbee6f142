"""The machine a benchmark runs on, and how a runner is measured on it.

- :func:`machine_record`: CPU, cores, threads, OS, library versions, ONNX Runtime providers, GPU and
  TensorRT (None when absent), and the load average, since a shared machine slows every row.
- :func:`unavailable_reason`: why a backend cannot run here (a package is missing), or None.
- :func:`time_inference`: warm-up, then timed inferences (the runner's host wall clock around the
  backend call, copies included) until the coefficient of variation (sample std / mean) is at most
  ``target_cv`` after ``min_runs`` runs, or ``min_time_s`` of timed runs are spent, or ``max_runs``.
- :func:`peak_rss_growth`: growth of the process's resident set over a block (Linux): the kernel's
  high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident size at the
  start, taken after ``gc.collect`` and glibc ``malloc_trim``. Weights, runtime arenas and
  activations count; memory an allocator still holds from before and reuses does not, so it is a
  lower bound.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import math
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edge_tl.install_profile import importable
from edge_tl.runners.base import Runner

logger = logging.getLogger(__name__)

_BACKEND_MODULES = {"torch": ("torch",), "onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt", "pycuda")}


def library_versions(*modules: str) -> dict[str, str]:
    """Python's, torch's (None in the device install) and numpy's versions plus each named module's
    ``__version__``, for manifests."""
    versions = {"python": platform.python_version(), "torch": _version("torch"), "numpy": np.__version__}
    versions.update({name: importlib.import_module(name).__version__ for name in modules})
    return versions


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ("model name" on x86; "Hardware" or "Model" on ARM boards),
    else the board name from the device tree (Jetson), else what ``platform`` knows."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model"):
        if fields.get(key) and not fields[key].isdigit():  # x86's "model" is a number
            return fields[key]
    board = Path("/proc/device-tree/model")
    if board.is_file():
        return board.read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Logical cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(module: str) -> str | None:
    """``module.__version__``, or None when it is not installed (torch in the device install)."""
    if not importable(module):
        return None
    return str(importlib.import_module(module).__version__)


def _gpu() -> dict[str, Any]:
    """The GPU and CUDA version: from torch on the training side, from pycuda on a device without torch."""
    if importable("torch"):
        import torch

        if not torch.cuda.is_available():
            return {"gpu": None, "cuda": None}
        return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    if importable("pycuda"):
        import pycuda.driver as cuda

        try:
            cuda.init()
            if cuda.Device.count():
                return {"gpu": cuda.Device(0).name(), "cuda": ".".join(str(part) for part in cuda.get_version())}
        except cuda.Error as err:  # no driver or no device: a machine record without a GPU
            logger.info("no CUDA device for the machine record: %s", err)
    return {"gpu": None, "cuda": None}


def _tensorrt_version() -> str | None:
    return _version("tensorrt")


def _onnxruntime() -> dict[str, Any]:
    if not importable("onnxruntime"):
        return {"onnxruntime": None, "onnxruntime_providers": []}
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnxruntime_providers": list(ort.get_available_providers())}


def machine_record(threads: int) -> dict[str, Any]:
    """Everything that explains a latency: ``threads`` is the intra-op thread count the rows used."""
    import numpy

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads,
        "load_average_1min": round(load[0], 2) if load else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "torch": _version("torch"),
        **_onnxruntime(),
        **_gpu(),
        "tensorrt": _tensorrt_version(),
    }


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (a package is missing), or None when it can."""
    missing = [name for name in _BACKEND_MODULES[backend] if not importable(name)]
    if not missing:
        return None
    fix = "pip install 'edge-tl[tensorrt]' on an NVIDIA GPU machine" if backend == "tensorrt" else (
        f"pip install {backend}")
    return f"{backend} needs {' and '.join(missing)}, not installed here; {fix}"


def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


@contextmanager
def peak_rss_growth() -> Iterator[dict[str, int | None]]:
    """Yield ``{"bytes": None}``; on exit ``bytes`` is the resident-set high-water mark's growth over
    the body (Linux), or stays None where the kernel does not let the mark be reset."""
    measured: dict[str, int | None] = {"bytes": None}
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None
    if trim is not None:
        trim(0)  # hand freed heap back to the OS so that this row's allocations show up as growth
    before = _status_kib("VmRSS") if _reset_peak_rss() else None
    yield measured
    peak = _status_kib("VmHWM")
    if before is not None and peak is not None:
        measured["bytes"] = max(peak - before, 0) * 1024


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (linear interpolation), min and max of the samples."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"mean": float(samples.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(samples.min()), "max": float(samples.max())}


def coefficient_of_variation(samples_ms: Sequence[float]) -> float:
    """Sample standard deviation over mean (inf for fewer than two samples)."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    return float(samples.std(ddof=1) / samples.mean()) if len(samples) > 1 and samples.mean() > 0 else math.inf


def time_inference(runner: Runner, feed: Mapping[str, np.ndarray], *, warmup: int, min_runs: int, max_runs: int,
                   min_time_s: float, target_cv: float) -> list[float]:
    """Warm up, then time ``runner.infer(feed)`` until settled, over budget or at ``max_runs``; ms per run.
    At least two runs are timed, whatever the budget."""
    for _ in range(warmup):
        runner.infer(feed)
    samples: list[float] = []
    total = total_squares = 0.0
    deadline = time.perf_counter() + min_time_s
    while True:
        runner.infer(feed)
        sample = runner.last_inference_ms
        samples.append(sample)
        total, total_squares = total + sample, total_squares + sample * sample
        count = len(samples)
        if count >= min_runs:  # running sums keep each check O(1); the reported cv is recomputed
            variance = max(total_squares - total * total / count, 0.0) / (count - 1)
            if math.sqrt(variance) <= target_cv * total / count:
                return samples
        if count >= max_runs or (count >= 2 and time.perf_counter() >= deadline):
            return samples


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` for the block, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
