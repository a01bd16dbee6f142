"""FP16 ONNX: float16 weights and compute, float32 inputs and outputs.

The conversion is ONNX Runtime's own ``onnxruntime.transformers.float16`` with
``keep_io_types=True``: every float tensor and initializer becomes float16 and a Cast sits at each
graph input and output, so callers keep feeding float32 images and reading float32 logits. That
is the form TensorRT 11's strongly typed networks need (the types in the file decide the
precision) and TensorRT <= 10 accepts. ONNX Runtime's CPU provider runs it too (it inserts casts
around ops that have no float16 kernel), which is how its parity is measured here.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.artifacts import atomic_output_path, sha256_file
from edge_tl.errors import ArtifactError
from export.onnx_export import check_onnx, parity_input, topological_sort
from export.onnx_metadata import ort_session, read_onnx_metadata, set_metadata

logger = logging.getLogger(__name__)


def convert_to_fp16(model):
    """A float16 copy of an FP32 ModelProto with float32 inputs/outputs (Cast at the boundaries)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    topological_sort(converted.graph)  # the converter appends the boundary Casts at the end
    return converted


def export_fp16_onnx(fp32_path: str | os.PathLike, path: str | os.PathLike) -> dict[str, Any]:
    """Write the FP16 version of the FP32 ONNX file ``fp32_path`` to ``path``; returns a report.

    Metadata is carried over (``precision`` set to ``fp16``). ``max_abs_diff`` is the largest
    absolute logit difference between the two files in ONNX Runtime on a fixed normal input.
    """
    import json

    import onnx

    fp32_path, path = Path(fp32_path), Path(path)
    if not fp32_path.is_file():
        raise ArtifactError(f"FP32 ONNX file {fp32_path} does not exist; export fp32 first")
    source = onnx.load(str(fp32_path))
    metadata = {prop.key: prop.value for prop in source.metadata_props}
    fp16 = check_onnx(convert_to_fp16(source))
    set_metadata(fp16, {**metadata, "precision": json.dumps("fp16")})

    input_meta = source.graph.input[0]
    dims = input_meta.type.tensor_type.shape.dim
    img_size = dims[2].dim_value
    batch = 1 if dims[0].dim_value == 1 else 2
    x = parity_input(img_size, batch)
    name = input_meta.name
    expected = ort_session(source).run(None, {name: x})[0]
    got = ort_session(fp16).run(None, {name: x})[0]
    if got.dtype != np.float32:
        raise ArtifactError(f"FP16 model output is {got.dtype}, expected float32 (Cast missing); this is a bug")
    with atomic_output_path(path) as tmp:
        onnx.save(fp16, str(tmp))
    report = {
        "path": str(path), "precision": "fp16", "source": str(fp32_path), "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size, "max_abs_diff_vs_fp32": float(np.max(np.abs(got - expected))),
        "metadata": read_onnx_metadata(fp16),
    }
    logger.info("wrote %s (%d bytes), max |FP16 - FP32| = %.2e", path, report["size_bytes"], report["max_abs_diff_vs_fp32"])
    return report
