"""Build a TensorRT engine from an exported ONNX file, verify its precision, write its manifest.

Thin on purpose: every decision (which ONNX, which flags, what counts as a dropped precision,
whether an engine fits this machine) is a tested pure function in :mod:`export.tensorrt_compat`
or here (:func:`check_qdq_for_tensorrt`, :func:`engine_manifest`). Needs TensorRT (and pycuda
for on-device calibration); both are imported only when building.
"""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any, Mapping

from calibrate.sources import CalibrationSource
from edge_tl.artifacts import atomic_output_path, atomic_write_json, read_json, sha256_file
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from export.tensorrt_compat import (
    BuildPlan, check_engine_matches, check_precision, configure, create_network, engine_information,
    float_convolutions, import_tensorrt, plan_build,
)

logger = logging.getLogger(__name__)


def manifest_path(engine_path: str | os.PathLike) -> Path:
    return Path(f"{engine_path}.manifest.json")


def check_qdq_for_tensorrt(onnx_model) -> int:
    """Raise ConfigError unless every QuantizeLinear is symmetric int8 (what TensorRT accepts).

    Returns the number of QuantizeLinear nodes. The ONNX Runtime Q/DQ export (uint8 activations)
    fails here: export with ``target="tensorrt"`` for engines.
    """
    from onnx import numpy_helper

    zero_points = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    count = 0
    for node in onnx_model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        count += 1
        zero_point = zero_points.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None or zero_point.dtype.name != "int8" or zero_point.any():
            kind = "missing" if zero_point is None else f"{zero_point.dtype.name} {zero_point.tolist()}"
            raise ConfigError(
                f"Q/DQ node {node.name or node.output[0]} has zero point {kind}; TensorRT needs symmetric int8. "
                "Build the engine from the TensorRT Q/DQ export (export_qdq_onnx(..., target='tensorrt'))"
            )
    if count == 0:
        raise ConfigError("the ONNX file has no QuantizeLinear nodes; INT8 from Q/DQ needs the Q/DQ export")
    return count


def engine_manifest(plan: BuildPlan, environment: Mapping[str, Any], onnx_path: Path, calibration_hash: str | None,
                    settings: Mapping[str, Any], layer_precisions: Mapping[str, int]) -> dict[str, Any]:
    return {
        "format": "edge-tl-engine", "version": 1, **dict(environment),
        "dla_core": plan.dla_core, "precision": plan.expected_precision, "onnx": str(onnx_path.name),
        "onnx_sha256": sha256_file(onnx_path), "calibration_sha256": calibration_hash,
        "strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
        "settings": dict(settings), "convolution_input_types": dict(layer_precisions),
    }


def _environment(trt) -> dict[str, Any]:
    try:
        import pycuda.driver as cuda
    except ImportError as err:
        raise BackendUnavailableError(f"pycuda is needed to read the GPU properties ({err}); pip install pycuda") from err
    cuda.init()  # device properties need no context
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return {
        "tensorrt_version": trt.__version__, "cuda_driver_version": cuda.get_driver_version(),
        "gpu_name": device.name(), "compute_capability": f"{major}.{minor}", "machine": platform.machine(),
    }


def check_engine_for_machine(engine_path: str | os.PathLike) -> dict[str, Any]:
    """Read an engine's manifest and raise ArtifactError if this machine cannot load the engine."""
    trt = import_tensorrt()
    manifest = read_json(manifest_path(engine_path))
    environment = _environment(trt)
    check_engine_matches(manifest, environment["tensorrt_version"], environment["compute_capability"])
    return manifest


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str,
    img_size: int,
    int8_source: str = "qdq",
    calibration_cache: str | os.PathLike | None = None,
    calibration_source: CalibrationSource | None = None,
    calibration_hash: str | None = None,
    dla_core: int | None = None,
    workspace_mb: int = 1024,
    timing_cache: str | os.PathLike | None = None,
    max_batch: int = 1,
) -> dict[str, Any]:
    """Build ``engine_path`` from ``onnx_path`` with the installed TensorRT; returns the manifest.

    Give the ONNX file :func:`export.tensorrt_compat.plan_build` asks for (``plan.onnx_kind``).
    INT8 from a cache needs ``calibration_cache`` (written from calibration.json, or by calibrating
    on ``calibration_source`` when the file does not exist yet).
    """
    import onnx

    trt = import_tensorrt()
    plan = plan_build(trt.__version__, precision, int8_source, dla_core)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    float_layers: tuple[str, ...] = ()
    if plan.onnx_kind == "qdq":
        qdq_model = onnx.load(str(onnx_path), load_external_data=False)
        check_qdq_for_tensorrt(qdq_model)
        float_layers = float_convolutions(qdq_model)  # the float stem: FP32 in a strongly typed network
    if plan.calibration_cache and calibration_cache is None:
        raise ConfigError("INT8 from a calibration cache needs --calibration-cache FILE")
    if plan.calibration_cache and not Path(calibration_cache).is_file() and calibration_source is None:
        raise ConfigError(
            f"calibration cache {calibration_cache} does not exist and no calibration images were given; "
            "write the cache from calibration.json or pass a calibration source"
        )
    environment = _environment(trt)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = create_network(trt, builder, plan)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    configure(trt, config, plan, workspace_mb << 20)
    input_tensor = network.get_input(0)
    profile = builder.create_optimization_profile()
    shape = (1, 3, img_size, img_size)
    profile.set_shape(input_tensor.name, shape, shape, (max_batch, 3, img_size, img_size))
    config.add_optimization_profile(profile)
    if plan.calibration_cache:
        from calibrate.tensorrt_calibrator import make_entropy_calibrator

        source = calibration_source if calibration_source is not None else _NoImages()
        batch = getattr(source, "batch_size", 1)
        calibration_profile = builder.create_optimization_profile()
        calibration_shape = (batch, 3, img_size, img_size)
        calibration_profile.set_shape(input_tensor.name, calibration_shape, calibration_shape, calibration_shape)
        config.set_calibration_profile(calibration_profile)
        config.int8_calibrator = make_entropy_calibrator(source, batch, calibration_cache)
    cache = None
    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    context.set_input_shape(input_tensor.name, shape)
    counts = check_precision(engine_information(trt, engine, context), plan.expected_precision, float_layers)
    with atomic_output_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache is not None:
        with atomic_output_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    settings = {"img_size": img_size, "max_batch": max_batch, "workspace_mb": workspace_mb,
                "int8_source": int8_source if precision == "int8" else None}
    manifest = engine_manifest(plan, environment, onnx_path, calibration_hash, settings, counts)
    atomic_write_json(manifest_path(engine_path), manifest)
    logger.info("built %s (%s, TensorRT %s): convolutions by input type %s", engine_path, precision,
                trt.__version__, counts)
    return manifest


class _NoImages:
    """A source with no batches: TensorRT then relies on the calibration cache alone."""

    input_name = "input"
    batch_size = 1

    def get_next(self):
        return None

    def rewind(self) -> None:
        pass
