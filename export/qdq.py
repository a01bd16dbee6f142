"""Explicit INT8 Q/DQ ONNX from calibration.json (never from ONNX Runtime's own calibrator).

The BN-folded model is exported to FP32 ONNX, each Conv/Gemm node is tied to its PyTorch module
(:mod:`export.onnx_ranges`), and then:

- weights become int8 initializers (per output channel, symmetric, scales from calibration.json)
  read through ``DequantizeLinear(axis=0)``;
- activation tensors around Conv, Gemm, Add and pooling ops get a ``QuantizeLinear ->
  DequantizeLinear`` pair with the calibrated per-tensor scale and zero point.

A Conv/Gemm whose module has no ``:weight`` entry in calibration.json keeps its float weight and
bias, and with no entry at all it gets no Q/DQ of its own (calibrate/FORMAT.md). That is how the
classifier head stays float by default: the last Conv's quantized output is dequantized before
GlobalAveragePool, so the pooled features reach a float Gemm, and the trunk still fuses.

Two targets, because ONNX Runtime on x86 and TensorRT want different files:

- ``onnxruntime`` (default): uint8 activations with zero points, int32 biases through
  DequantizeLinear (scale ``x_scale * w_scale``). ONNX Runtime fuses ``DQ -> Conv -> Q`` into
  QLinearConv (U8S8, its fast x86 path; S8 activations are much slower there), Add into
  QLinearAdd, GlobalAveragePool into QLinearGlobalAveragePool and Gemm into QGemm. A Conv followed
  by Relu or Clip (ReLU6) is quantized after the activation: with zero point 0 and a range inside
  the clip bounds, ONNX Runtime drops the Relu/Clip as redundant and fuses the Conv.
- ``tensorrt``: symmetric int8 activations (zero point 0, ``scale = max(|min|, |max|) / 127``)
  and float biases, as TensorRT's Q/DQ (8.5+, 10, 11 strongly typed) requires; TensorRT rejects
  uint8 Q/DQ.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from calibrate.calibration_file import Calibration
from calibrate.ranges import asymmetric_uint8, symmetric_int8_scale
from edge_tl.artifacts import atomic_output_path, sha256_file
from edge_tl.errors import ArtifactError, ConfigError
from export.onnx_export import (
    DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, metadata_props, check_onnx, ort_session, parity_input,
    set_metadata, torch_to_onnx_proto,
)
from export.onnx_ranges import constant_values, map_nodes_to_modules, tensor_ranges

logger = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "tensorrt")
QUANTIZED_OPS = ("Conv", "Gemm", "Add", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat")
FUSED_ACTIVATIONS = ("Relu", "Clip")
INT32_MAX = 2**31 - 1


def _names(graph) -> set[str]:
    used = {init.name for init in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        used.update(node.output)
        used.add(node.name)
    return used


class _Builder:
    """New initializers and nodes with names that do not collide with the graph's."""

    def __init__(self, graph) -> None:
        self.graph, self.used = graph, _names(graph)

    def name(self, base: str) -> str:
        candidate, counter = base, 1
        while candidate in self.used:
            candidate, counter = f"{base}_{counter}", counter + 1
        self.used.add(candidate)
        return candidate

    def initializer(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def dequantize(self, base: str, quantized: np.ndarray, scale: np.ndarray, axis: int | None, zero_point: bool):
        """A DequantizeLinear of a constant with zero point 0 (stored, or left to the ONNX default)."""
        from onnx import helper

        inputs = [self.initializer(f"{base}_quantized", quantized), self.initializer(f"{base}_scale", scale)]
        if zero_point:  # ONNX Runtime fuses Gemm into QGemm only with an explicit weight zero point
            inputs.append(self.initializer(f"{base}_zero_point", np.zeros(scale.shape, quantized.dtype)))
        output = self.name(f"{base}_dequantized")
        kwargs = {"axis": axis} if axis is not None else {}
        return helper.make_node("DequantizeLinear", inputs, [output], name=self.name(f"{base}_DequantizeLinear"), **kwargs), output


def _activation_params(tensor: str, value_range: tuple[float, float], entry, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) arrays for an activation tensor."""
    low, high = value_range
    if target == "tensorrt":
        return np.float32(symmetric_int8_scale(max(abs(low), abs(high)))), np.int8(0)
    if entry is not None and entry.min == low and entry.max == high:
        scale, zero_point = entry.as_arrays()  # exactly the calibrated parameters (QAT may differ)
        return scale, zero_point
    scale, zero_point = asymmetric_uint8(low, high)
    return np.float32(scale), np.uint8(zero_point)


def _weight_scales(module: str, weight: np.ndarray, calibration: Calibration, axis: int) -> np.ndarray:
    entry = calibration.get(module, "weight")
    scales = np.asarray(entry.scale, dtype=np.float32).reshape(-1)
    if scales.size != weight.shape[axis]:
        raise ArtifactError(
            f"calibration weight scales of {module} have {scales.size} channels, the model has {weight.shape[axis]}; "
            "recalibrate the model being exported"
        )
    actual = np.abs(np.moveaxis(weight, axis, 0).reshape(scales.size, -1)).max(axis=1)
    recorded = np.maximum(np.abs(np.asarray(entry.min)), np.abs(np.asarray(entry.max)))
    if not np.allclose(actual, recorded, rtol=1e-3, atol=1e-6):
        logger.warning(
            "weight range of %s in calibration.json differs from the model's (max rel diff %.2g): was it "
            "calibrated on the BN-folded model being exported?", module,
            float(np.max(np.abs(actual - recorded) / np.maximum(recorded, 1e-12))),
        )
    return scales


def _quantize_weight(builder: _Builder, node, module: str, values, calibration: Calibration,
                     input_scale: np.ndarray | None, target: str) -> list:
    """Replace ``node``'s weight (and bias for onnxruntime) with int8/int32 initializers + DQ."""
    weight = values[node.input[1]].astype(np.float32)
    axis = 0
    if node.op_type == "Gemm" and not next((a.i for a in node.attribute if a.name == "transB"), 0):
        axis = 1
    scales = _weight_scales(module, weight, calibration, axis)
    has_bias = len(node.input) > 2 and node.input[2] and node.input[2] in values
    new_nodes = []
    if has_bias and input_scale is not None and target == "onnxruntime":
        bias = values[node.input[2]].astype(np.float64)
        # keep |bias / (x_scale * w_scale)| within int32: raise the weight scale of near-zero channels
        floor = np.abs(bias) / (float(input_scale) * INT32_MAX)
        scales = np.maximum(scales, floor.astype(np.float32) * np.float32(1.0001))
        bias_scale = (np.float32(input_scale) * scales).astype(np.float32)
        quantized_bias = np.clip(np.round(bias / bias_scale), -INT32_MAX, INT32_MAX).astype(np.int32)
        dq, output = builder.dequantize(f"{node.name}_bias", quantized_bias, bias_scale, 0, zero_point=False)
        node.input[2] = output
        new_nodes.append(dq)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scales.reshape(shape)), -128, 127).astype(np.int8)
    dq, output = builder.dequantize(f"{node.name}_weight", quantized, scales, axis, zero_point=True)
    node.input[1] = output
    return [dq, *new_nodes]


def _tensors_to_quantize(graph, ranges: Mapping[str, tuple[float, float]]) -> list[str]:
    consumers: dict[str, list] = {}
    producer = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    outputs = {o.name for o in graph.output}
    chosen = []
    for tensor in ranges:
        if tensor in outputs:
            continue
        users = consumers.get(tensor, [])
        source = producer.get(tensor)
        # a data input of a quantized op (any input of Add/Mul/Concat; input 0 of the others)
        feeds_quantized = any(
            (u.op_type in QUANTIZED_OPS and u.input[0] == tensor) or u.op_type in ("Add", "Mul", "Concat")
            for u in users
        )
        from_quantized = source is not None and source.op_type in QUANTIZED_OPS
        if from_quantized and source.op_type in ("Conv", "Gemm") and users and all(
            u.op_type in FUSED_ACTIVATIONS for u in users
        ):
            from_quantized = False  # quantized after the activation instead
        after_fused_activation = (
            source is not None and source.op_type in FUSED_ACTIVATIONS
            and producer.get(source.input[0]) is not None and producer[source.input[0]].op_type in ("Conv", "Gemm")
        )
        if feeds_quantized or from_quantized or after_fused_activation:
            chosen.append(tensor)
    return chosen


def remove_unused(graph) -> None:
    """Drop nodes whose outputs nothing reads and initializers no node reads (the float weights)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(name in used for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_graph(proto, model: nn.Module, calibration: Calibration, target: str = "onnxruntime"):
    """Rewrite an FP32 ModelProto exported from ``model`` (BN-folded) into explicit Q/DQ, in place.

    Returns a summary: quantized weight nodes, quantized activation tensors, tensors left float,
    and the modules left float (``float_layers``: no ``:weight`` entry in ``calibration``).
    """
    from onnx import helper

    if target not in TARGETS:
        raise ConfigError(f"unknown Q/DQ target {target!r}; choose one of {', '.join(TARGETS)}")
    graph = proto.graph
    node_modules = map_nodes_to_modules(graph, model)
    ranges = tensor_ranges(graph, node_modules, calibration)
    values = constant_values(graph)
    builder = _Builder(graph)
    direct = {}
    for node in graph.node:
        module = node_modules.get(node.name)
        if module is not None:
            direct.setdefault(node.input[0], calibration.get(module, "input"))
            direct.setdefault(node.output[0], calibration.get(module, "output"))
    activations = {
        tensor: _activation_params(tensor, ranges[tensor], direct.get(tensor), target)
        for tensor in _tensors_to_quantize(graph, ranges)
    }
    weight_nodes: dict[str, list] = {}
    float_layers = sorted(module for module in node_modules.values() if calibration.get(module, "weight") is None)
    if float_layers:
        logger.info("no weight entry in calibration.json: %s stay float", ", ".join(float_layers))
    # Measured with ONNX Runtime 1.32 (graph optimisations on): a Conv that keeps float weights
    # between quantized activations computes wrong outputs (-29 points on magnetic-tile).
    sandwiched = sorted({node_modules[node.name] for node in graph.node if node.op_type == "Conv"
                         and node_modules.get(node.name) in float_layers and node.input[0] in activations}
                        ) if target == "onnxruntime" else []
    if sandwiched:
        raise ArtifactError(f"calibration.json quantizes the input of {sandwiched[0]} but not its weight, and ONNX "
                            "Runtime computes such a convolution wrongly; re-run `edge-tl quantize` so that every "
                            "quantized convolution has a weight entry")
    for node in graph.node:
        module = node_modules.get(node.name)
        if module is not None and module not in float_layers:
            input_scale = activations.get(node.input[0], (None, None))[0]
            weight_nodes[node.name] = _quantize_weight(builder, node, module, values, calibration, input_scale, target)
    unknown = sorted({tensor.module for tensor in calibration.tensors} - set(node_modules.values()))
    if unknown or not weight_nodes:
        what = f"names modules {unknown[:3]} the model has no Conv/Gemm for" if unknown else "quantizes no layer"
        raise ArtifactError(f"calibration.json {what}; recalibrate the BN-folded model being exported "
                            "(`edge-tl quantize`)")

    rewired: dict[str, str] = {}
    qdq_after: dict[str, list] = {}
    for tensor, (scale, zero_point) in activations.items():
        scale_name = builder.initializer(f"{tensor}_scale", np.asarray(scale, np.float32))
        zero_name = builder.initializer(f"{tensor}_zero_point", np.asarray(zero_point))
        quantized, dequantized = builder.name(f"{tensor}_quantized"), builder.name(f"{tensor}_dequantized")
        qdq_after[tensor] = [
            helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [quantized],
                             name=builder.name(f"{tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [dequantized],
                             name=builder.name(f"{tensor}_DequantizeLinear")),
        ]
        rewired[tensor] = dequantized
    original = list(graph.node)
    for node in original:
        for index, name in enumerate(node.input):
            if name in rewired:
                node.input[index] = rewired[name]
    ordered = [n for i in graph.input for n in qdq_after.get(i.name, [])]
    for node in original:
        ordered.extend(weight_nodes.get(node.name, []))
        ordered.append(node)
        for name in node.output:
            ordered.extend(qdq_after.get(name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    remove_unused(graph)
    fused_inputs = {node.input[0] for node in original if node.op_type in FUSED_ACTIVATIONS and node.output[0] in activations}
    float_tensors = sorted(
        name for node in original if node.op_type in QUANTIZED_OPS for name in node.output
        if name not in activations and name not in fused_inputs and name not in {o.name for o in graph.output}
    )
    return {"quantized_weights": len(weight_nodes), "quantized_activations": len(activations),
            "float_activations": float_tensors, "float_layers": float_layers,
            "activation_dtype": "int8" if target == "tensorrt" else "uint8"}


def fused_op_counts(model_or_path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime (CPU, extended optimizations) actually runs."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.intra_op_num_threads = 1
        source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return dict(Counter(node.op_type for node in optimized.graph.node))


def export_qdq_onnx(
    model: nn.Module,
    calibration: Calibration,
    img_size: int,
    path: str | os.PathLike,
    target: str = "onnxruntime",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an explicit Q/DQ INT8 ONNX of ``model`` from ``calibration``; returns the export report.

    The report compares ONNX Runtime's INT8 logits with the FP32 model's on a fixed normal input
    (``max_abs_diff``, ``top1_agreement``) and lists the fused ops ONNX Runtime runs.
    """
    import onnx

    from edge_tl.fold import fold_batchnorm

    if opset < 13:
        raise ConfigError(f"opset {opset} has no per-channel DequantizeLinear; use 13 or later")
    props = metadata_props({**dict(metadata or {}), "precision": "int8", "qdq_target": target},
                            img_size, INPUT_NAME, OUTPUT_NAME)
    folded = fold_batchnorm(model.eval())
    proto = torch_to_onnx_proto(folded, img_size, opset, dynamic_batch)
    summary = quantize_graph(proto, folded, calibration, target)
    proto = check_onnx(proto)
    set_metadata(proto, props)
    proto.producer_name = "edge-tl"

    x = parity_input(img_size, 2 if dynamic_batch else 1)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    got = ort_session(proto).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    path = Path(path)
    with atomic_output_path(path) as tmp:
        onnx.save(proto, str(tmp))
    report = {
        "path": str(path), "precision": "int8", "qdq_target": target, "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size, "opset": opset, "dynamic_batch": dynamic_batch,
        "calibration_method": calibration.method, "calibration_files_hash": calibration.calibration_files_hash,
        "max_abs_diff": float(np.max(np.abs(got - expected))),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
        "ort_ops": fused_op_counts(path), **summary,
    }
    logger.info("wrote %s: %d weights, %d activations quantized (%s), ORT runs %s", path,
                summary["quantized_weights"], summary["quantized_activations"], target, report["ort_ops"])
    return report
