"""Every TensorRT version difference edge-tl depends on, in one place, with the reason for each.

Supported: 8.5 and 8.6 (JetPack 5.1 / 6.0), 10.x (JetPack 6.1+, desktop), 11.x (strongly typed
only; DLA from 11.4.1 on AGX Orin with JetPack 7.2.2+). The pure functions here (version parsing,
which flags a precision needs, reading the engine inspector's JSON, matching an engine manifest to
a machine) are tested without TensorRT; the functions at the end are the thin layer that calls the
installed TensorRT (``import tensorrt`` inside each, so the package imports without it), checked
name by name against each version's bindings in tests/test_tensorrt_conformance.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping

from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    import tensorrt

PRECISIONS = ("fp16", "int8")
INT8_SOURCES = ("qdq", "cache")
FIRST_DLA_11 = (11, 4, 1)  # TensorRT 11.0-11.4.0 have no DLA; 11.4.1 brings it back (AGX Orin, JetPack 7.2.2+)
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[.+\-]?[A-Za-z0-9.+\-]*)$")


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of '8.6.1', '10.3.0.26', '11.4.0.106' or an early access '10.0.0b6'."""
    match = _VERSION.match(str(version).strip())
    if match is None:
        raise ConfigError(f"TensorRT version {version!r} is not MAJOR.MINOR[.PATCH] (e.g. 10.3.0)")
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return major, minor, patch


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


def max_onnx_opset(trt_version: str) -> int | None:
    """The newest ONNX opset the version's parser reads (None: every opset edge-tl exports, 13-21).

    TensorRT 8.5's parser stops at opset 17; 8.6 and later read what edge-tl exports."""
    major, minor, _ = parse_version(trt_version)
    return 17 if (major, minor) == (8, 5) else None


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
    int8_source: str | None = None  # "qdq" | "cache" for int8 (what the plan chose), None for fp16
    layer_precision: str | None = None  # "fp16": ask it of every convolution (PREFER_PRECISION_CONSTRAINTS)


def _check_dla_core(dla_core: int | None) -> None:
    if dla_core is not None and (isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0):
        raise ConfigError(f"--dla-core {dla_core!r} must be an integer >= 0 (Jetson Orin has cores 0 and 1)")


def plan_build(trt_version: str, precision: str, int8_source: str = "qdq", dla_core: int | None = None) -> BuildPlan:
    """The version-dependent build decisions for ``precision`` (fp16|int8) on ``trt_version``.

    ``int8_source`` is the INT8 source asked for; the plan's ``int8_source`` is the one to build
    from: INT8 on DLA before TensorRT 11 is always "cache" (DLA runs implicit INT8 from the FP32
    ONNX and its calibration cache, not Q/DQ networks), so give ``plan.onnx_kind``'s file.
    """
    version = check_supported(trt_version)
    if precision not in PRECISIONS:
        raise ConfigError(f"engine precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if int8_source not in INT8_SOURCES:
        raise ConfigError(f"INT8 source {int8_source!r} is not one of {', '.join(INT8_SOURCES)}")
    _check_dla_core(dla_core)
    if version[0] >= 11:
        # TensorRT 11 removed weakly typed networks, precision builder flags and implicit INT8
        # calibration: precision comes from the file (FP16 initializers/casts, or Q/DQ nodes).
        if precision == "int8" and int8_source == "cache":
            raise ConfigError(
                f"TensorRT {trt_version} has no implicit INT8 calibration; build INT8 from the TensorRT Q/DQ ONNX "
                "(`edge-tl export RUN_DIR --format onnx --precision int8 --target tensorrt`), without --calibration-cache"
            )
        if dla_core is not None and version < FIRST_DLA_11:
            raise ConfigError(
                f"TensorRT {trt_version} has no DLA support (TensorRT 8.5-10.x, or 11.4.1+ on AGX Orin with "
                "JetPack 7.2.2+); drop --dla-core"
            )
        return BuildPlan("fp16" if precision == "fp16" else "qdq", True, ("GPU_FALLBACK",) if dla_core is not None else (),
                         False, False, dla_core, precision, "qdq" if precision == "int8" else None)
    if precision == "fp16":
        # FP16 alone lets the builder keep FP32 tactics; prefer FP16 per convolution, report any left FP32
        flags = ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
        source = None
    else:
        flags = ["INT8", "FP16"]  # FP16 too: layers INT8 cannot run
        source = "cache" if dla_core is not None else int8_source
    if dla_core is not None:
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build
    return BuildPlan(
        onnx_kind="qdq" if source == "qdq" else "fp32",
        strongly_typed=False,
        builder_flags=tuple(flags),
        calibration_cache=source == "cache",
        # 8.x: implicit batch is still the default, explicit batch must be requested (ONNX needs it);
        # 10.x: explicit batch is the only mode and the flag is deprecated
        explicit_batch_flag=version[0] < 10,
        dla_core=dla_core,
        expected_precision=precision,
        int8_source=source,
        layer_precision="fp16" if precision == "fp16" else None,
    )


# --- reading the engine inspector's JSON (ProfilingVerbosity.DETAILED) -------------------------------


def _datatype(text: str) -> str:
    lowered = text.lower()
    if "int8" in lowered:
        return "int8"
    if "fp16" in lowered or "half" in lowered:
        return "fp16"
    if "fp32" in lowered or "float" in lowered:
        return "fp32"
    return "unknown"


def _input_datatype(layer: Mapping[str, Any]) -> str:
    """The first input's datatype: 8.5-10.x write "Format/Datatype"; later writers split it into
    "DataType" and "Format"; all name the type inside the text ("... Int8 format", "Half")."""
    inputs = layer.get("Inputs") or [{}]
    first = inputs[0] if isinstance(inputs[0], Mapping) else {}
    return _datatype(" ".join(str(first[key]) for key in ("Format/Datatype", "DataType", "Format") if key in first))


def _layers(inspector_json: str | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    info = json.loads(inspector_json) if isinstance(inspector_json, str) else inspector_json
    layers = info.get("Layers", [])
    if any(not isinstance(layer, Mapping) for layer in layers):
        raise ArtifactError("engine inspector gave layer names only; build with ProfilingVerbosity.DETAILED")
    return layers


def _is_dla(layer: Mapping[str, Any]) -> bool:
    """A DLA subgraph is one ``{ForeignNode[first...last]}`` layer whose type is DLA."""
    return "DLA" in f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}".upper()


def convolution_precisions(inspector_json: str | Mapping[str, Any]) -> list[tuple[str, str]]:
    """(layer name, input datatype) of every GPU convolution in an engine inspector JSON (DETAILED).

    TensorRT 8.5-11 write ``{"Layers": [{"Name", "LayerType", "ParameterType", "Inputs": [...]}]}``;
    DLA subgraphs are left out (:func:`dla_layer_count`).
    """
    found = []
    for layer in _layers(inspector_json):
        kind = f"{layer.get('ParameterType', '')} {layer.get('LayerType', '')}"
        if "Convolution" in kind and not _is_dla(layer):
            found.append((str(layer.get("Name", "?")), _input_datatype(layer)))
    return found


def dla_layer_count(inspector_json: str | Mapping[str, Any]) -> int:
    return sum(1 for layer in _layers(inspector_json) if _is_dla(layer))


def layer_name_parts(name: str) -> tuple[str, ...]:
    """The network layers a fused engine layer came from: "a + b" -> ("a", "b")."""
    return tuple(part.strip() for part in name.split(" + "))


def float_convolutions(onnx_model) -> tuple[str, ...]:
    """Names of the Conv and Gemm nodes of a Q/DQ ONNX model whose weights are float initializers
    (no DequantizeLinear): the float stem and the float head that the INT8 export leaves float."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    return tuple(node.name for node in onnx_model.graph.node
                 if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1] in initializers)


def fp32_convolutions(inspector_json: str | Mapping[str, Any], float_layers: Collection[str] = ()) -> list[str]:
    """GPU convolutions that run FP32 although no part of them is one of ``float_layers``."""
    wanted_float = set(float_layers)
    return [name for name, datatype in convolution_precisions(inspector_json)
            if datatype == "fp32" and not wanted_float.intersection(layer_name_parts(name))]


def check_precision(inspector_json: str | Mapping[str, Any], expected: str, float_layers: Collection[str] = (),
                    qdq: bool = False, fp32_allowed: bool = False) -> dict[str, int]:
    """Raise ArtifactError if the engine dropped the requested precision; returns per-datatype counts
    of the GPU convolutions (and ``"dla"``: the number of DLA subgraphs).

    Dropped means: no convolution runs ``expected`` (and no DLA subgraph does); a convolution runs
    FP32 although it is not one of ``float_layers`` (unless ``fp32_allowed``: FP16 prefers, and
    the caller reports :func:`fp32_convolutions`); with ``qdq`` (INT8 from a Q/DQ file), a
    convolution other than ``float_layers`` does not run INT8. ``float_layers`` are ONNX node
    names the Q/DQ file leaves float on purpose (:func:`float_convolutions`), matched exactly
    against each part of a fused engine layer's name.
    """
    convolutions = convolution_precisions(inspector_json)
    dla_layers = dla_layer_count(inspector_json)
    counts: dict[str, int] = {}
    for _, datatype in convolutions:
        counts[datatype] = counts.get(datatype, 0) + 1
    if dla_layers:
        counts["dla"] = dla_layers
    if not convolutions and not dla_layers:
        raise ArtifactError("the engine inspector lists no convolution or DLA layers; cannot verify the engine's precision")
    wanted_float = set(float_layers)
    if qdq:  # explicit quantization: every Q/DQ convolution must run INT8
        bad = [(name, datatype) for name, datatype in convolutions
               if datatype != "int8" and not wanted_float.intersection(layer_name_parts(name))]
    else:
        bad = [] if fp32_allowed else [(name, "fp32") for name in fp32_convolutions(inspector_json, float_layers)]
    if bad or not (counts.get(expected) or dla_layers):
        by_type: dict[str, list[str]] = {}
        for name, datatype in bad:
            by_type.setdefault(datatype, []).append(name)
        details = "".join(f"; {datatype.upper()}: {', '.join(names[:5])}" for datatype, names in by_type.items())
        raise ArtifactError(
            f"TensorRT dropped the requested {expected} precision: convolutions by input type {counts}{details}"
            f"{' (Q/DQ convolutions must run INT8)' if qdq and bad else ''}. Check the build log for unsupported layers"
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


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError (also for a stub-only folder named tensorrt)."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(
            "TensorRT is not installed; pip install 'edge-tl[tensorrt]' on the device (JetPack ships it)"
        ) from err
    if not isinstance(getattr(trt, "__version__", None), str):
        raise BackendUnavailableError(
            f"the tensorrt package at {list(getattr(trt, '__path__', []))} has no __version__ (type stubs only?); "
            "pip install 'edge-tl[tensorrt]' on the device"
        )
    return trt


def create_network(builder: tensorrt.Builder, plan: BuildPlan) -> tensorrt.INetworkDefinition:
    import tensorrt as trt

    flags = 0
    if plan.explicit_batch_flag:  # 8.x only; 10.x deprecated the flag, 11.x removed it
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    # strongly typed: TensorRT 11 networks always are (no flag needed); on 8.x/10.x edge-tl builds weakly typed
    return builder.create_network(flags)


def configure(config: tensorrt.IBuilderConfig, plan: BuildPlan, workspace_bytes: int) -> None:
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)  # 8.4+
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer formats for the inspector
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core


def prefer_layer_precision(network: tensorrt.INetworkDefinition, plan: BuildPlan) -> int:
    """Ask FP16 of every convolution and matrix multiply (with PREFER_PRECISION_CONSTRAINTS the
    builder falls back only where FP16 has no tactic); returns how many layers were asked."""
    if plan.layer_precision != "fp16":
        return 0
    import tensorrt as trt

    kinds = (trt.LayerType.CONVOLUTION, trt.LayerType.MATRIX_MULTIPLY)
    asked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in kinds:
            layer.precision = trt.DataType.HALF
            asked += 1
    return asked


def engine_information(engine: tensorrt.ICudaEngine, context: tensorrt.IExecutionContext | None = None) -> str:
    import tensorrt as trt

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
