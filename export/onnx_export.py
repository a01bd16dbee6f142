"""FP32 ONNX export with checks, preprocessing metadata and a parity measurement.

``export_onnx`` folds BatchNorm into the convolutions first (:func:`edge_tl.fold.fold_batchnorm`),
so the ONNX Conv weights are bit-identical to the folded PyTorch model's: the Q/DQ builder and the
TensorRT cache writer find each Conv's PyTorch module by weight equality. The model is exported
with the TorchScript exporter (``dynamo=False``) and constant folding, checked with
``onnx.checker`` (full check) and strict shape inference, given metadata describing its
preprocessing, measured against PyTorch in ONNX Runtime, and written atomically.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from edge_tl.artifacts import atomic_output_path, sha256_file
from edge_tl.errors import ArtifactError, ConfigError
from export.onnx_metadata import INPUT_NAME, OUTPUT_NAME, metadata_props, ort_session, set_metadata

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_SEED = 0
# The most an export's logits may differ from its PyTorch model's on the parity input, as a share of
# the logits' scale (max |PyTorch logit|, at least 1): the one place these tolerances are stated.
# Real exports reach: FP32 below 1e-5 of scale (round-off of the folded BatchNorm), FP16 a few 1e-3
# (tests/test_export_stage.py bounds it at 1e-2), INT8 0.64 of scale on the coarse 64 px test model
# and 0.95 when every activation range saturates (tests/test_verify.py's deliberately bad export,
# which must still be written so that verify can reject it). INT8 accuracy is verify's to judge;
# its bound here only refuses an export whose logits are off by more than twice their own scale.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2.0}


def torch_to_onnx_proto(model: nn.Module, img_size: int, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                        input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME):
    """Export ``model`` (eval mode, CPU) with the TorchScript exporter; returns the ModelProto."""
    import onnx

    model = model.eval()
    dummy = torch.zeros(1, 3, img_size, img_size)
    buffer = io.BytesIO()
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(
            model, (dummy,), buffer, input_names=[input_name], output_names=[output_name],
            opset_version=opset, do_constant_folding=True, dynamic_axes=axes, dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (in place)."""
    available = {init.name for init in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ArtifactError(f"ONNX graph has a cycle or a missing input near node {pending[0].name!r}; this is a bug")
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
    del graph.node[:]
    graph.node.extend(ordered)


def check_onnx(model):
    """onnx.checker (full) and strict shape inference; returns the shape-inferred model."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ArtifactError(f"the exported ONNX model is invalid ({str(err).splitlines()[0]}); this is a bug in the export") from err


def parity_input(img_size: int, batch: int, seed: int = PARITY_SEED) -> np.ndarray:
    """The fixed input parity is measured on: standard normal, like normalised images."""
    return np.random.default_rng(seed).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)


def logit_scale(model: nn.Module, img_size: int, batch: int) -> float:
    """max |logit| of ``model`` on the parity input, at least 1: what :data:`PARITY_TOLERANCE` is relative to."""
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(parity_input(img_size, batch)))
    return max(1.0, float(logits.abs().max()))


def check_parity(max_abs_diff: float, scale: float, precision: str, path: str | os.PathLike) -> dict[str, float]:
    """The parity record of an export; an ArtifactError when ``max_abs_diff`` exceeds the precision's tolerance."""
    tolerance = PARITY_TOLERANCE[precision] * scale
    if not np.isfinite(max_abs_diff) or max_abs_diff > tolerance:
        raise ArtifactError(
            f"{Path(path).name}: max |ONNX - PyTorch| {max_abs_diff:.3g} exceeds the {precision} tolerance "
            f"{tolerance:.3g} ({PARITY_TOLERANCE[precision]:g} x logit scale {scale:.3g}); the export is broken, "
            "nothing was written: report it as a bug")
    return {"max_abs_diff_tolerance": tolerance, "logit_scale": scale}


def export_onnx(
    model: nn.Module,
    img_size: int,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, Any] | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> dict[str, Any]:
    """Export ``model`` to an FP32 ONNX file at ``path``; returns the export report.

    ``metadata`` must hold ``mean``, ``std`` and ``class_names`` (``ok_class`` and anything
    else JSON-serialisable is stored too, e.g. ``stage``, ``backbone``). The report holds
    ``max_abs_diff``: the largest absolute logit difference between ONNX Runtime and PyTorch on a
    fixed normal input (batch 2 when the batch is dynamic).
    """
    import onnx
    import onnxruntime

    from edge_tl.fold import fold_batchnorm

    if not isinstance(opset, int) or not 13 <= opset <= 21:
        raise ConfigError(f"opset {opset!r} is not supported; use 13 to 21 (default {DEFAULT_OPSET})")
    props = metadata_props({"precision": "fp32", **dict(metadata or {})}, img_size, input_name, output_name)
    model = model.eval()
    folded = fold_batchnorm(model)
    proto = check_onnx(torch_to_onnx_proto(folded, img_size, opset, dynamic_batch, input_name, output_name))
    set_metadata(proto, props)
    proto.producer_name = "edge-tl"

    batch = 2 if dynamic_batch else 1
    x = parity_input(img_size, batch)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = ort_session(proto).run([output_name], {input_name: x})[0]
    max_abs_diff = float(np.max(np.abs(got - expected)))

    path = Path(path)
    with atomic_output_path(path) as tmp:
        onnx.save(proto, str(tmp))
    report = {
        "path": str(path),
        "precision": "fp32",
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "opset": opset,
        "input_name": input_name,
        "output_name": output_name,
        "input_shape": ["batch" if dynamic_batch else 1, 3, img_size, img_size],
        "dynamic_batch": dynamic_batch,
        "max_abs_diff": max_abs_diff,
        "parity_batch": batch,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }
    logger.info("exported %s (%d bytes), max |ONNX - PyTorch| = %.2e", path, report["size_bytes"], max_abs_diff)
    return report
