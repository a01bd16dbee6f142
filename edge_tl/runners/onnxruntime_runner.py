"""ONNX Runtime runner: CPU by default, CUDA / TensorRT execution providers when asked and present."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edge_tl.errors import ArtifactError, BackendUnavailableError
from edge_tl.runners.base import Runner, TensorSpec

CPU = "CPUExecutionProvider"
_ONNX_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (or serialized bytes) in ONNX Runtime.

    ``intra_op_threads`` sets the thread count of one inference (None: ONNX Runtime's default,
    one per physical core); benchmarks pin it, e.g. to 1 for single-core edge CPUs.
    """

    def __init__(self, model: str | os.PathLike | bytes, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        label = "bytes" if isinstance(model, bytes) else Path(model).name
        super().__init__(f"onnxruntime:{label}")
        self.model, self.providers, self.intra_op_threads = model, list(providers or [CPU]), intra_op_threads
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort

        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime providers {missing} are not available (have {ort.get_available_providers()}); "
                "install onnxruntime-gpu or use the CPU provider"
            )
        if not isinstance(self.model, bytes) and not Path(self.model).is_file():
            raise ArtifactError(f"ONNX file {self.model} does not exist; export it first")
        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = 1
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf errors
            raise ArtifactError(f"ONNX Runtime cannot load {self.name} ({str(err).splitlines()[0]}); re-export it") from err

    def _deactivate(self) -> None:
        self.session = None

    def _input_specs(self) -> dict[str, TensorSpec]:
        specs = {}
        for meta in self.session.get_inputs():
            shape = tuple(dim if isinstance(dim, int) else None for dim in meta.shape)
            specs[meta.name] = TensorSpec(meta.name, shape, np.dtype(_ONNX_TYPES.get(meta.type, np.float32)))
        return specs

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [meta.name for meta in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feed))))
