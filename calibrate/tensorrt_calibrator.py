"""On-device INT8 calibration for TensorRT <= 10: an ``IInt8EntropyCalibrator2`` over a source.

TensorRT and pycuda are imported inside :func:`make_entropy_calibrator`, so this module imports
on machines without them. The calibrator reads batches from a calibration source (preprocessing
lives there), copies each into one pycuda device buffer, and reads/writes the calibration cache
(:mod:`calibrate.tensorrt_cache` documents the format; a cache written from calibration.json is
read back here and TensorRT then skips calibrating). The buffer lives in the device's primary
CUDA context, the one TensorRT's runtime uses (as the TensorRT runner does); ``pycuda.autoinit``
would create and push a second context after the Builder exists, whose pointers TensorRT cannot use.
TensorRT 11 has no implicit INT8: the factory refuses it (build INT8 from the Q/DQ ONNX there).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.sources import CalibrationSource
from edge_tl.artifacts import atomic_write_bytes
from edge_tl.errors import BackendUnavailableError, ConfigError
from export.tensorrt_compat import parse_version

logger = logging.getLogger(__name__)

LAST_IMPLICIT_INT8_MAJOR = 10


def make_entropy_calibrator(source: CalibrationSource, batch_size: int, cache_path: str | os.PathLike | None = None):
    """An ``IInt8EntropyCalibrator2`` feeding ``source`` to TensorRT, ``batch_size`` images a batch.

    A batch smaller than ``batch_size`` (the end of the source) is skipped: the calibration
    profile fixes the input shape. With ``cache_path``, an existing cache is handed to TensorRT
    (no calibration runs) and a new one is written there atomically. Call ``release()`` after
    the build to free the device buffer.
    """
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(
            f"on-device INT8 calibration needs TensorRT and pycuda ({err}); pip install 'edge-tl[tensorrt]' "
            "on the device, or build from the TensorRT Q/DQ ONNX"
        ) from err
    if parse_version(trt.__version__)[0] > LAST_IMPLICIT_INT8_MAJOR:
        raise ConfigError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration (IInt8EntropyCalibrator2 is gone since 11); "
            "build INT8 from the TensorRT Q/DQ ONNX without --calibration-cache"
        )
    cuda.init()
    cuda_context = cuda.Device(0).retain_primary_context()
    cache = Path(cache_path) if cache_path is not None else None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_buffer: Any = None  # a pycuda DeviceAllocation once the first batch arrives
            self.batches = 0
            source.rewind()

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            while (feed := source.get_next()) is not None:
                batch = np.ascontiguousarray(feed[source.input_name], dtype=np.float32)
                if batch.shape[0] == batch_size:
                    break
                logger.info("skipping a calibration batch of %d images (batch size %d)", batch.shape[0], batch_size)
            else:
                logger.info("calibration fed %d batches", self.batches)
                return None
            cuda_context.push()
            try:
                if self.device_buffer is None:
                    self.device_buffer = cuda.mem_alloc(batch.nbytes)
                cuda.memcpy_htod(self.device_buffer, batch)
            finally:
                cuda_context.pop()
            self.batches += 1
            return [int(self.device_buffer)]

        def read_calibration_cache(self):
            if cache is not None and cache.is_file():
                logger.info("using TensorRT calibration cache %s", cache)
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data) -> None:
            if cache is not None:
                atomic_write_bytes(cache, bytes(data))
                logger.info("wrote TensorRT calibration cache %s", cache)

        def release(self) -> None:
            """Free the device buffer (in the primary context it was allocated in)."""
            if self.device_buffer is not None:
                cuda_context.push()
                try:
                    self.device_buffer.free()
                finally:
                    cuda_context.pop()
                self.device_buffer = None

    return EntropyCalibrator()
