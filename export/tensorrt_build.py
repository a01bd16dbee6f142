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
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from calibrate.sources import CalibrationSource
from edge_tl.artifacts import atomic_output_path, atomic_write_json, read_json, sha256_file
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from export.tensorrt_compat import (
    BuildPlan, check_engine_matches, check_precision, configure, create_network, engine_information,
    float_convolutions, fp32_convolutions, import_tensorrt, max_onnx_opset, plan_build,
    prefer_layer_precision,
)

if TYPE_CHECKING:
    import tensorrt

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
        raise ConfigError("the ONNX file has no QuantizeLinear nodes; INT8 from Q/DQ needs the TensorRT Q/DQ export "
                          "(`edge-tl export RUN_DIR --format onnx --precision int8 --target tensorrt`)")
    return count


def _input_dims(onnx_model) -> list[int | None]:
    """The first graph input's dimensions (None: a named or unknown, i.e. dynamic, dimension)."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    graph_input = next(value for value in onnx_model.graph.input if value.name not in initializers)
    return [dim.dim_value if dim.HasField("dim_value") else None
            for dim in graph_input.type.tensor_type.shape.dim]


def _has_fp16(onnx_model) -> bool:
    from onnx import TensorProto

    graph = onnx_model.graph
    return (any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer)
            or any(node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute)
                   for node in graph.node))


def check_onnx_for_plan(onnx_model, name: str, plan: BuildPlan, trt_version: str, img_size: int,
                        max_batch: int) -> tuple[str, ...]:
    """Raise ConfigError unless ``onnx_model`` is the file ``plan`` builds from, at ``img_size`` px
    and up to ``max_batch`` images; returns the layers it leaves float on purpose (Q/DQ files)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"--max-batch {max_batch!r} must be an integer >= 1")
    opset = next((entry.version for entry in onnx_model.opset_import if entry.domain in ("", "ai.onnx")), None)
    cap = max_onnx_opset(trt_version)
    if cap is not None and opset is not None and opset > cap:
        raise ConfigError(f"{name} has ONNX opset {opset}; TensorRT {trt_version} reads opset <= {cap}: "
                          f"re-export it with `edge-tl export RUN_DIR --format onnx --opset {cap}`")
    dims = _input_dims(onnx_model)
    if len(dims) != 4 or dims[1] != 3:
        raise ConfigError(f"{name} takes an input of shape {dims}; edge-tl engines take NCHW RGB images (N, 3, H, W)")
    if any(size is not None and size != img_size for size in dims[2:]):
        raise ConfigError(f"{name} takes {dims[2]}x{dims[3]} px images, not {img_size} px; give the run's image size")
    if dims[0] is not None and dims[0] != max_batch:
        raise ConfigError(f"{name} has a fixed batch of {dims[0]}; --max-batch {max_batch} needs a dynamic-batch ONNX "
                          f"(`edge-tl export RUN_DIR --format onnx --dynamic-batch`) or --max-batch {dims[0]}")
    qdq_nodes = sum(node.op_type == "QuantizeLinear" for node in onnx_model.graph.node)
    if plan.onnx_kind == "qdq":
        check_qdq_for_tensorrt(onnx_model)
        return float_convolutions(onnx_model)
    if qdq_nodes and plan.dla_core is not None and plan.expected_precision == "int8":
        raise ConfigError(f"{name} is a Q/DQ ONNX; INT8 on DLA with TensorRT {trt_version} builds from the FP32 ONNX "
                          "and its calibration cache: give the FP32 file and --calibration-cache FILE")
    if qdq_nodes:
        what = "drop --calibration-cache" if plan.calibration_cache else "give the FP32 or FP16 ONNX"
        raise ConfigError(f"{name} is a Q/DQ (INT8) ONNX, but this is a {plan.expected_precision} build from "
                          f"{plan.onnx_kind.upper()} ONNX; {what}")
    if plan.onnx_kind == "fp16" and not _has_fp16(onnx_model):
        raise ConfigError(f"{name} is an FP32 ONNX; TensorRT {trt_version} builds FP16 from an FP16 ONNX (strongly "
                          "typed): `edge-tl export RUN_DIR --format onnx --precision fp16`")
    return ()


def engine_manifest(plan: BuildPlan, environment: Mapping[str, Any], onnx_path: Path, calibration_hash: str | None,
                    settings: Mapping[str, Any], layer_precisions: Mapping[str, int],
                    fp32_layers: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "format": "edge-tl-engine", "version": 1, **dict(environment),
        "dla_core": plan.dla_core, "precision": plan.expected_precision, "onnx": str(onnx_path.name),
        "onnx_sha256": sha256_file(onnx_path), "calibration_sha256": calibration_hash,
        "strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
        "settings": dict(settings), "convolution_input_types": dict(layer_precisions),
        "fp32_convolutions": list(fp32_layers),
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


def _timing_cache(config: tensorrt.IBuilderConfig, path: Path | None) -> tensorrt.ITimingCache | None:
    """The timing cache the build uses and updates (written back after the build), or None.

    A cache that ``set_timing_cache`` refuses (another TensorRT version or GPU, or a damaged file)
    is reported and left as it is: the engine builds without it and the file is not overwritten.
    """
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    logger.warning("TensorRT refused the timing cache %s (built by another TensorRT or GPU, or damaged); building "
                   "without it and leaving the file unchanged: delete it or pass another --timing-cache", path)
    return None


def _add_profiles(builder: tensorrt.Builder, config: tensorrt.IBuilderConfig, input_name: str, img_size: int,
                  max_batch: int, calibration_batch: int | None) -> None:
    """Dynamic batch: min 1, opt and max ``max_batch``; calibration runs at its own fixed batch."""
    # pybind11 converts the tuples to Dims; the stubs name Dims only, hence the ignores
    profile = builder.create_optimization_profile()
    low, high = (1, 3, img_size, img_size), (max_batch, 3, img_size, img_size)
    profile.set_shape(input_name, low, high, high)  # type: ignore[arg-type]
    config.add_optimization_profile(profile)
    if calibration_batch is not None:
        calibration = builder.create_optimization_profile()
        shape = (calibration_batch, 3, img_size, img_size)
        calibration.set_shape(input_name, shape, shape, shape)  # type: ignore[arg-type]
        config.set_calibration_profile(calibration)


def _check_calibration_inputs(plan: BuildPlan, name: str, calibration_cache: Path | None,
                              calibration_source: CalibrationSource | None) -> None:
    if not plan.calibration_cache:
        return
    if calibration_cache is None:
        raise ConfigError(f"INT8 from the FP32 ONNX {name} needs its TensorRT calibration cache: "
                          "pass --calibration-cache FILE")
    if not calibration_cache.is_file() and calibration_source is None:
        raise ConfigError(f"calibration cache {calibration_cache} does not exist; pass the model.STAGE.int8.calib "
                          "that `edge-tl export RUN_DIR --format engine --precision int8` writes beside its FP32 ONNX")


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

    Give the ONNX file :func:`export.tensorrt_compat.plan_build` asks for (``plan.onnx_kind``:
    checked by :func:`check_onnx_for_plan` before any TensorRT work). INT8 from a cache needs
    ``calibration_cache`` (written from calibration.json, or by calibrating on
    ``calibration_source`` when the file does not exist yet). A dynamic-batch ONNX gets the profile
    min 1, opt and max ``max_batch``.
    """
    import onnx

    import_tensorrt()  # BackendUnavailableError unless a real TensorRT imports
    import tensorrt as trt

    plan = plan_build(trt.__version__, precision, int8_source, dla_core)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"ONNX file {onnx_path} does not exist; export it with `edge-tl export RUN_DIR --format onnx`")
    model = onnx.load(str(onnx_path), load_external_data=False)
    float_layers = check_onnx_for_plan(model, onnx_path.name, plan, trt.__version__, img_size, max_batch)
    dynamic_batch = _input_dims(model)[0] is None
    del model
    cache_path = Path(calibration_cache) if calibration_cache is not None else None
    _check_calibration_inputs(plan, onnx_path.name, cache_path, calibration_source)
    environment = _environment(trt)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = create_network(builder, plan)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors}")
    asked = prefer_layer_precision(network, plan)
    config = builder.create_builder_config()
    configure(config, plan, workspace_mb << 20)
    input_name = network.get_input(0).name
    calibrator, calibration_batch = None, None
    if plan.calibration_cache:
        from calibrate.tensorrt_calibrator import make_entropy_calibrator

        source = calibration_source if calibration_source is not None else _NoImages()
        calibration_batch = int(getattr(source, "batch_size", 1))
        calibrator = make_entropy_calibrator(source, calibration_batch, cache_path)
        config.int8_calibrator = calibrator
    if dynamic_batch:
        _add_profiles(builder, config, input_name, img_size, max_batch, calibration_batch)
    timing_path = Path(timing_cache) if timing_cache is not None else None
    cache = _timing_cache(config, timing_path)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.release()
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    runtime = trt.Runtime(trt_logger)
    if plan.dla_core is not None:
        runtime.DLA_core = plan.dla_core  # before deserializing: the engine loads onto this core
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise ArtifactError(f"TensorRT cannot load the engine it built from {onnx_path}; see the TensorRT log above")
    context = engine.create_execution_context()
    shape = (1 if dynamic_batch else max_batch, 3, img_size, img_size)
    if not context.set_input_shape(input_name, shape):
        raise ArtifactError(f"the engine built from {onnx_path} refuses input shape {shape}; see the TensorRT log")
    information = engine_information(engine, context)
    lenient = plan.expected_precision == "fp16" or plan.calibration_cache  # TensorRT may keep FP32 tactics
    counts = check_precision(information, plan.expected_precision, float_layers, qdq=plan.onnx_kind == "qdq",
                             fp32_allowed=lenient)
    fp32_layers = fp32_convolutions(information, float_layers)
    if fp32_layers:
        logger.warning("%d convolutions of %s stay FP32 in the %s engine (no %s tactic): %s", len(fp32_layers),
                       onnx_path.name, plan.expected_precision, plan.expected_precision, ", ".join(fp32_layers[:5]))
    with atomic_output_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache is not None and timing_path is not None:
        with atomic_output_path(timing_path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    settings = {"img_size": img_size, "max_batch": max_batch, "workspace_mb": workspace_mb,
                "int8_source": plan.int8_source, "dynamic_batch": dynamic_batch, "fp16_layers_asked": asked,
                "timing_cache_used": cache is not None}
    manifest = engine_manifest(plan, environment, onnx_path, calibration_hash, settings, counts, fp32_layers)
    atomic_write_json(manifest_path(engine_path), manifest)
    logger.info("built %s (%s, TensorRT %s): convolutions by input type %s", engine_path, precision,
                trt.__version__, counts)
    return manifest


class _NoImages:
    """A source with no batches: TensorRT then relies on the calibration cache alone."""

    input_name = "input"
    batch_size = 1

    def get_next(self) -> None:
        return None

    def rewind(self) -> None:
        pass
