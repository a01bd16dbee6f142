"""Tie calibration.json (PyTorch module names) to ONNX tensors.

Exporters name ONNX nodes and values as they like, so nothing here trusts names: each Conv/Gemm
node is matched to its PyTorch module by exact weight equality (the FP32 export writes the
BN-folded weights unchanged), then every ``<module>:input`` / ``<module>:output`` range lands on
that node's input / output tensor. Ranges then flow through ops that keep or clip values (Relu,
Clip, Flatten, Reshape, MaxPool, ...) to the tensors around them, so a ReLU6 output or a pooled
feature vector gets a range without being observed under its own name.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from torch import nn

from calibrate.calibration_file import Calibration
from edge_tl.errors import ArtifactError

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "Gemm")
# ops whose output holds exactly the input's values (rearranged or selected)
PASS_THROUGH_OPS = ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")


def constant_values(graph) -> dict[str, np.ndarray]:
    """Every tensor of ``graph`` known without running it: initializers, Constant and Identity outputs."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_float", "value_int"):
                    values[node.output[0]] = np.asarray(attribute.f if attribute.name == "value_float" else attribute.i)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _gemm_weight(node, weight: np.ndarray) -> np.ndarray:
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return weight if trans_b else weight.T


def map_nodes_to_modules(graph, model: nn.Module) -> dict[str, str]:
    """{ONNX node name: module name} for every Conv/Gemm node, matched by exact weight equality.

    ``model`` must be the module the ONNX file was exported from (the BN-folded model). Modules
    with identical weights are assigned in graph order. Raises ArtifactError when a Conv or Gemm
    node matches no module.
    """
    candidates: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight.detach().cpu().numpy().astype(np.float32)
            candidates.setdefault((weight.shape, weight.tobytes()), []).append(name)
    values = constant_values(graph)
    mapping: dict[str, str] = {}
    unmatched = []
    for index, node in enumerate(graph.node):
        if node.op_type not in WEIGHTED_OPS:
            continue
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        weight = values.get(node.input[1])
        if weight is None:
            unmatched.append(node.name)
            continue
        if node.op_type == "Gemm":
            weight = _gemm_weight(node, weight)
        queue = candidates.get((weight.shape, np.ascontiguousarray(weight, dtype=np.float32).tobytes()))
        if not queue:
            unmatched.append(node.name)
            continue
        mapping[node.name] = queue.pop(0)
    if unmatched:
        raise ArtifactError(
            f"ONNX nodes {unmatched[:5]} match no Conv2d/Linear weight of the model ({len(unmatched)} in all); "
            "export the BN-folded model the calibration was made on"
        )
    return mapping


def _union(ranges: Iterable[tuple[float, float]]) -> tuple[float, float]:
    ranges = list(ranges)
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _clip_bounds(node, values: dict[str, np.ndarray]) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    low = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    for attribute in node.attribute:  # opset < 11 keeps the bounds as attributes
        if attribute.name == "min":
            low = attribute.f
        elif attribute.name == "max":
            high = attribute.f
    return (-np.inf if low is None else float(low)), (np.inf if high is None else float(high))


def direct_ranges(graph, node_modules: dict[str, str], calibration: Calibration) -> dict[str, tuple[float, float]]:
    """Ranges observed on Conv/Gemm inputs and outputs, by ONNX tensor name (union when seen twice)."""
    observed: dict[str, list[tuple[float, float]]] = {}
    for node in graph.node:
        module = node_modules.get(node.name)
        if module is None:
            continue
        for role, tensor in (("input", node.input[0]), ("output", node.output[0])):
            entry = calibration.get(module, role)
            if entry is not None:
                observed.setdefault(tensor, []).append((float(entry.min), float(entry.max)))
    return {tensor: _union(found) for tensor, found in observed.items()}


def tensor_ranges(graph, node_modules: dict[str, str], calibration: Calibration) -> dict[str, tuple[float, float]]:
    """Observed ranges plus those that follow through Relu/Clip (clipped) and pass-through ops."""
    ranges = dict(direct_ranges(graph, node_modules, calibration))
    values = constant_values(graph)
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if not node.input or not node.output:
                continue
            source, target = node.input[0], node.output[0]
            if node.op_type in ("Relu", "Clip") and source in ranges and target not in ranges:
                low, high = _clip_bounds(node, values)
                ranges[target] = tuple(float(np.clip(v, low, high)) for v in ranges[source])
                changed = True
            elif node.op_type in PASS_THROUGH_OPS:
                if source in ranges and target not in ranges:
                    ranges[target] = ranges[source]
                    changed = True
                elif target in ranges and source not in ranges and node.op_type != "MaxPool":
                    ranges[source] = ranges[target]
                    changed = True
    return ranges


def export_tensorrt_cache(
    onnx_path, model: nn.Module, calibration: Calibration, cache_path, trt_version: str
) -> dict[str, float]:
    """Write a TensorRT implicit-INT8 calibration cache for the FP32 ONNX file ``onnx_path``.

    ``model`` is the PyTorch model ``onnx_path`` was exported from with
    :func:`export.onnx_export.export_onnx` (it is BN-folded here the same way). Every ONNX tensor
    with a calibrated range gets ``scale = max(|min|, |max|) / 127``; returns those scales.
    """
    import onnx

    from calibrate.tensorrt_cache import scales_from_ranges, write_calibration_cache
    from edge_tl.fold import fold_batchnorm

    graph = onnx.load(str(onnx_path)).graph
    node_modules = map_nodes_to_modules(graph, fold_batchnorm(model))
    scales = scales_from_ranges(tensor_ranges(graph, node_modules, calibration))
    write_calibration_cache(cache_path, scales, trt_version)
    logger.info("wrote TensorRT %s calibration cache %s with %d tensors", trt_version, cache_path, len(scales))
    return scales
