"""Every TensorRT version difference edge-tl depends on, in one place, with the reason for each.

Supported: 8.5 and 8.6 (JetPack 5.1 / 6.0), 10.x (JetPack 6.1+, desktop), 11.x (strongly typed
only). The pure functions here (version parsing, which flags a precision needs, reading the engine
inspector's JSON, matching an engine manifest to a machine) are tested without TensorRT; the
functions taking a ``trt`` module are the thin layer that calls the installed TensorRT.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError

PRECISIONS = ("fp16", "int8")
INT8_SOURCES = ("qdq", "cache")


def parse_version(version: str) -> tuple[int, int, int]:
    try:
        parts = [int(part) for part in str(version).split(".")[:3]]
    except ValueError:
        raise ConfigError(f"TensorRT version {version!r} is not MAJOR.MINOR[.PATCH]") from None
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def check_supported(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) if edge-tl can build with this TensorRT, else BackendUnavailableError."""
    major, minor, patch = parse_version(version)
    # < 8.5: no tensor-name I/O API (num_io_tensors / set_tensor_address), which the runner uses
    # 9.x: never shipped on Jetson or as a general release
    if (major, minor) < (8, 5) or major == 9 or major > 11:
        raise BackendUnavailableError(
            f"TensorRT {version} is not supported; edge-tl builds with TensorRT 8.5, 8.6, 10.x or 11.x"
        )
    return major, minor, patch


@dataclass(frozen=True)
class BuildPlan:
    """What to build from and which switches to set, decided from the version and the request."""

    onnx_kind: str  # "fp32" | "fp16" | "qdq": which exported ONNX file the engine is built from
    strongly_typed: bool  # the ONNX types decide precisions (TensorRT 11; no precision flags)
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names
    calibration_cache: bool  # implicit INT8 from a calibration cache (IInt8EntropyCalibrator2)
    explicit_batch_flag: bool  # NetworkDefinitionCreationFlag.EXPLICIT_BATCH must be set
    dla_core: int | None
    expected_precision: str  # what the convolutions must run in after the build


def plan_build(trt_version: str, precision: str, int8_source: str = "qdq", dla_core: int | None = None) -> BuildPlan:
    """The version-dependent build decisions for ``precision`` (fp16|int8) on ``trt_version``."""
    major, _, _ = check_supported(trt_version)
    if precision not in PRECISIONS:
        raise ConfigError(f"engine precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if int8_source not in INT8_SOURCES:
        raise ConfigError(f"INT8 source {int8_source!r} is not one of {', '.join(INT8_SOURCES)}")
    if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0):
        raise ConfigError(f"DLA core {dla_core!r} must be an integer >= 0 (Jetson Orin has cores 0 and 1)")
    if major >= 11:
        # TensorRT 11 removed weakly typed networks, precision builder flags and implicit INT8
        # calibration: precision comes from the file (FP16 initializers/casts, or Q/DQ nodes).
        if precision == "int8" and int8_source == "cache":
            raise ConfigError(
                f"TensorRT {trt_version} has no implicit INT8 calibration; build INT8 from the Q/DQ ONNX (--int8-source qdq)"
            )
        if dla_core is not None:
            raise ConfigError(f"DLA builds are supported with TensorRT 8.5-10.x (JetPack), not {trt_version}")
        return BuildPlan("fp16" if precision == "fp16" else "qdq", True, (), False, False, None, precision)
    flags = ["FP16"] if precision == "fp16" else ["INT8", "FP16"]  # FP16 too: layers INT8 cannot run
    if dla_core is not None:
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build
    if precision == "int8" and int8_source == "cache":
        onnx_kind = "fp32"
    else:
        onnx_kind = "qdq" if precision == "int8" else "fp32"
    return BuildPlan(
        onnx_kind=onnx_kind,
        strongly_typed=False,
        builder_flags=tuple(flags),
        calibration_cache=precision == "int8" and int8_source == "cache",
        # 8.x: implicit batch is still the default, explicit batch must be requested (ONNX needs it);
        # 10.x: explicit batch is the only mode and the flag is deprecated
        explicit_batch_flag=major < 10,
        dla_core=dla_core,
        expected_precision=precision,
    )


def _datatype(text: str) -> str:
    lowered = text.lower()
    if "int8" in lowered:
        return "int8"
    if "fp16" in lowered or "half" in lowered:
        return "fp16"
    if "fp32" in lowered or "float" in lowered:
        return "fp32"
    return "unknown"


def convolution_precisions(inspector_json: str | Mapping[str, Any]) -> list[tuple[str, str]]:
    """(layer name, input datatype) of every convolution in an engine inspector JSON (DETAILED).

    TensorRT 8.5-11 write ``{"Layers": [{"Name", "LayerType", "ParameterType", "Inputs": [{"Format/Datatype": ...}]}]}``;
    the datatype is named inside the format text ("... Int8 format", "... FP16 format", "Float").
    """
    info = json.loads(inspector_json) if isinstance(inspector_json, str) else inspector_json
    found = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            raise ArtifactError("engine inspector gave layer names only; build with ProfilingVerbosity.DETAILED")
        kind = f"{layer.get('ParameterType', '')} {layer.get('LayerType', '')}"
        if "Convolution" not in kind:
            continue
        inputs = layer.get("Inputs") or [{}]
        found.append((str(layer.get("Name", "?")), _datatype(str(inputs[0].get("Format/Datatype", "")))))
    return found


def float_convolutions(onnx_model) -> tuple[str, ...]:
    """Names of the Conv nodes of a Q/DQ ONNX model whose weights are float initializers (no
    DequantizeLinear): the layers the INT8 export leaves float on purpose."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    return tuple(node.name for node in onnx_model.graph.node
                 if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers)


def check_precision(inspector_json: str | Mapping[str, Any], expected: str,
                    float_layers: Collection[str] = ()) -> dict[str, int]:
    """Raise ArtifactError if the engine dropped the requested precision; returns per-datatype counts.

    Dropped means: a convolution runs in FP32, or (for int8) no convolution runs in INT8. INT8
    convolutions that TensorRT moved to FP16 are allowed (FP16 is enabled as their fallback).
    ``float_layers`` are ONNX node names the Q/DQ file leaves float on purpose (the float stem,
    :func:`float_convolutions`): a strongly typed TensorRT 11 network runs them in FP32 as the
    file says, so an engine layer whose name contains one of them may be FP32.
    """
    convolutions = convolution_precisions(inspector_json)
    counts: dict[str, int] = {}
    for _, datatype in convolutions:
        counts[datatype] = counts.get(datatype, 0) + 1
    if not convolutions:
        raise ArtifactError("the engine inspector lists no convolution layers; cannot verify the engine's precision")
    in_fp32 = [name for name, datatype in convolutions
               if datatype == "fp32" and not any(layer in name for layer in float_layers)]
    if in_fp32 or (expected == "int8" and not counts.get("int8")):
        raise ArtifactError(
            f"TensorRT dropped the requested {expected} precision: convolutions by input type {counts}"
            f"{'; FP32: ' + ', '.join(in_fp32[:5]) if in_fp32 else ''}. Check the build log for unsupported layers"
        )
    return counts


def check_engine_matches(manifest: Mapping[str, Any], trt_version: str, compute_capability: str) -> None:
    """An engine only loads on the TensorRT version and GPU architecture it was built for."""
    built_version, built_cc = manifest.get("tensorrt_version"), manifest.get("compute_capability")
    if built_version != trt_version:
        raise ArtifactError(
            f"engine was built with TensorRT {built_version}, this machine has {trt_version}; rebuild the engine here"
        )
    if built_cc != compute_capability:
        raise ArtifactError(
            f"engine was built for compute capability {built_cc}, this GPU is {compute_capability}; rebuild the engine here"
        )


# --- thin calls into the installed TensorRT -------------------------------------------------------


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(
            "TensorRT is not installed; pip install 'edge-tl[tensorrt]' on the device (JetPack ships it)"
        ) from err
    return trt


def create_network(trt, builder, plan: BuildPlan):
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    # STRONGLY_TYPED appeared in 9.x/10.x; in 11 strong typing is the only mode and the flag may be gone
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def configure(trt, config, plan: BuildPlan, workspace_bytes: int) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)  # 8.4+
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer formats for the inspector
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core


def engine_information(trt, engine, context=None) -> str:
    inspector = engine.create_engine_inspector()
    if context is not None:  # with dynamic shapes the formats are only known for a context's shapes
        inspector.execution_context = context
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def check_engine_build_possible() -> None:
    """Raise BackendUnavailableError unless TensorRT imports and can open a builder on a GPU."""
    trt = import_tensorrt()
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as err:  # TensorRT raises its own runtime errors (and TypeError for a null builder)
        raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot open a builder ({err}); "
                                      "engines need an NVIDIA GPU and driver") from err
    if builder is None:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} found no usable GPU; engines need an NVIDIA GPU")
