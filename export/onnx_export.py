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
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from edge_tl.artifacts import atomic_output_path, sha256_file
from edge_tl.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
REQUIRED_METADATA = ("mean", "std", "class_names")
PARITY_SEED = 0


def preprocessing_metadata(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: list[str] | tuple[str, ...],
    ok_class: str | None = None,
    crop: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata ``export_onnx`` expects: what any runtime needs to feed the model correctly."""
    return {"mean": list(mean), "std": list(std), "class_names": list(class_names), "ok_class": ok_class,
            "img_size": img_size, "crop": float(crop), **extra}


def resize_description(crop: float) -> str:
    """How the runtime must resize an image: the whole image, or its centre ``crop`` share (``edge_tl.data``)."""
    if crop >= 1.0:
        return "whole image to input_size, bilinear, no crop"
    return (f"whole image to round(input_size / {crop:g}) square, bilinear, then the centre input_size square "
            "(centre crop)")


def metadata_props(metadata: Mapping[str, Any], img_size: int, input_name: str, output_name: str) -> dict[str, str]:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ConfigError(f"ONNX metadata lacks {', '.join(missing)}; pass mean, std and class_names of the run")
    for key in ("mean", "std"):
        if len(metadata[key]) != 3:
            raise ConfigError(f"metadata {key} {metadata[key]!r} must have 3 values (R, G, B)")
    if metadata.get("ok_class") is not None and metadata["ok_class"] not in metadata["class_names"]:
        raise ConfigError(f"ok class {metadata['ok_class']!r} is not one of the classes {metadata['class_names']}")
    values = {
        "input_name": input_name,
        "output_name": output_name,
        "input_size": [img_size, img_size],
        "channel_order": "RGB",
        "layout": "NCHW",
        "pixel_scale": 1.0 / 255.0,
        "normalization": "(rgb / 255 - mean) / std",
        "resize": resize_description(float(metadata.get("crop", 1.0))),
        "crop": 1.0,
        "ok_class": None,
        **{key: value for key, value in metadata.items() if key != "img_size"},
    }
    return {key: json.dumps(value) for key, value in values.items()}


def read_onnx_metadata(model_or_path) -> dict[str, Any]:
    """The metadata_props of an ONNX model, each value decoded from JSON."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path), load_external_data=False)
    decoded = {}
    for prop in model.metadata_props:
        try:
            decoded[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            decoded[prop.key] = prop.value
    return decoded


def set_metadata(model, props: Mapping[str, str]) -> None:
    """Replace ``model``'s metadata_props with ``props`` (string values)."""
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


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


def ort_session(model_or_path, threads: int = 1):
    """A CPU ONNX Runtime session for a ModelProto or a file, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def parity_input(img_size: int, batch: int, seed: int = PARITY_SEED) -> np.ndarray:
    """The fixed input parity is measured on: standard normal, like normalised images."""
    return np.random.default_rng(seed).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)


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
