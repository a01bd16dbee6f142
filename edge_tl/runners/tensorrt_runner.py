"""TensorRT runner with pycuda: page-locked host buffers, one stream, async copies, CUDA events.

Uses the tensor-name I/O API of TensorRT 8.5+ (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). Before deserializing, the engine's manifest
(written by :func:`export.tensorrt_build.build_engine`) is checked against this machine's
TensorRT version and GPU, so a mismatched engine is a clear ArtifactError, not a crash, and
the runtime's ``DLA_core`` is set to the core the engine was built for. Buffers live in the
device's primary CUDA context (the one TensorRT's runtime uses). TensorRT and pycuda are
imported only in :meth:`TensorRTRunner._activate`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_tl.runners.base import Runner, TensorSpec


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine; ``last_device_ms`` is the GPU time of the last inference
    (host-to-device copy, execution and device-to-host copy, between two CUDA events)."""

    def __init__(self, engine_path: str | os.PathLike, check_manifest: bool = True) -> None:
        super().__init__(f"tensorrt:{Path(engine_path).name}")
        self.engine_path, self.check_manifest = Path(engine_path), check_manifest
        self.last_device_ms: float | None = None
        self._state: dict = {}

    def _activate(self) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as err:
            raise BackendUnavailableError(
                f"the TensorRT runner needs tensorrt and pycuda ({err}); pip install 'edge-tl[tensorrt]'"
            ) from err
        if not self.engine_path.is_file():
            raise ArtifactError(f"engine {self.engine_path} does not exist; build it with `edge-tl export --format engine`")
        cuda.init()
        context = cuda.Device(0).retain_primary_context()
        context.push()
        try:
            dla_core = self._dla_core()
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            if dla_core is not None:
                if dla_core >= runtime.num_DLA_cores:
                    raise ArtifactError(f"engine {self.engine_path.name} runs on DLA core {dla_core}; this device has "
                                        f"{runtime.num_DLA_cores} DLA cores: rebuild with --dla-core 0 or without it")
                runtime.DLA_core = dla_core  # before deserializing: the engine loads onto this core
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT could not deserialize {self.engine_path}; rebuild it on this machine")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self._state = {
                "cuda": cuda, "trt": trt, "cuda_context": context, "runtime": runtime, "engine": engine,
                "context": engine.create_execution_context(), "stream": cuda.Stream(),
                "inputs": inputs, "outputs": [n for n in names if n not in inputs],
                "buffers": {}, "start": cuda.Event(), "end": cuda.Event(),
            }
        except BaseException:
            context.pop()
            raise

    def _dla_core(self) -> int | None:
        """The DLA core the engine's manifest names (checked against this machine), or None."""
        from export.tensorrt_build import check_engine_for_machine, manifest_path

        if self.check_manifest:
            manifest = check_engine_for_machine(self.engine_path)
        elif manifest_path(self.engine_path).is_file():
            from edge_tl.artifacts import read_json

            manifest = read_json(manifest_path(self.engine_path))
        else:
            return None
        dla_core = manifest.get("dla_core")
        return None if dla_core is None else int(dla_core)

    def _deactivate(self) -> None:
        state, self._state = self._state, {}
        for host, device in state.get("buffers", {}).values():
            device.free()
        for key in ("context", "engine", "runtime"):  # the runtime outlives its engine
            state.pop(key, None)
        state["cuda_context"].pop()

    def _input_specs(self) -> dict[str, TensorSpec]:
        engine, trt = self._state["engine"], self._state["trt"]
        specs = {}
        for name in self._state["inputs"]:
            shape = tuple(dim if dim >= 0 else None for dim in engine.get_tensor_shape(name))
            specs[name] = TensorSpec(name, shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        return specs

    def _profile_text(self, name: str) -> str:
        """'batch 1 to 8' from the engine's first optimization profile for input ``name``."""
        low, _, high = self._state["engine"].get_tensor_profile_shape(name, 0)
        return f"(batch {low[0]} to {high[0]})"

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype):
        """Page-locked host and device buffers for ``name``, reallocated when the shape changes."""
        cuda, buffers = self._state["cuda"], self._state["buffers"]
        current = buffers.get(name)
        if current is None or current[0].shape != shape:
            if current is not None:
                current[1].free()
            host = cuda.pagelocked_empty(shape, dtype)
            buffers[name] = (host, cuda.mem_alloc(host.nbytes))
        return buffers[name]

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = self._state
        cuda, trt, context, engine, stream = state["cuda"], state["trt"], state["context"], state["engine"], state["stream"]
        for name in state["inputs"]:
            if not context.set_input_shape(name, feed[name].shape):
                raise ConfigError(f"input {name!r} of shape {feed[name].shape} is outside the engine's profile "
                                  f"{self._profile_text(name)}; feed smaller batches or rebuild with --max-batch")
        state["start"].record(stream)
        for name in state["inputs"]:
            host, device = self._buffer(name, feed[name].shape, feed[name].dtype)
            np.copyto(host, feed[name])
            cuda.memcpy_htod_async(device, host, stream)
            context.set_tensor_address(name, int(device))
        outputs = {}
        for name in state["outputs"]:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = self._buffer(name, shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            context.set_tensor_address(name, int(outputs[name][1]))
        if not context.execute_async_v3(stream.handle):
            raise ArtifactError(f"TensorRT execution of {self.engine_path} failed; see the TensorRT log")
        for host, device in outputs.values():
            cuda.memcpy_dtoh_async(host, device, stream)
        state["end"].record(stream)
        state["end"].synchronize()
        self.last_device_ms = state["end"].time_since(state["start"])
        return {name: host.copy() for name, (host, _) in outputs.items()}
