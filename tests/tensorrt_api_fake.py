"""Strict stand-ins for ``tensorrt`` (one per version's name list) and ``pycuda.driver``.

Every public attribute read or written on the stand-in module, its enums and its objects is
checked against tests/tensorrt_api/tensorrt-<version>.txt (scripts/tensorrt_api_names.py); a name
the version lacks raises :class:`MissingName` (an AttributeError naming the version and the name).
A name is in a version's API when it is listed or ends a listed name (the linker keeps a string
that is the tail of another only once: ``INT8`` lives at the end of ``UINT8``). The objects do
just enough (record calls, hand back the inspector JSON a test sets) to drive edge-tl's build,
calibration and runner code without a GPU; ``events`` records the order of the calls that matter.
"""
from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

API_DIR = Path(__file__).resolve().parent / "tensorrt_api"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


VERSIONS = tuple(sorted((p.stem.removeprefix("tensorrt-") for p in API_DIR.glob("tensorrt-*.txt")), key=_version_key))


class MissingName(AttributeError):
    """The code used a name this TensorRT version's bindings do not define."""


class ApiNames:
    def __init__(self, version: str, names: frozenset[str], header: tuple[str, ...]) -> None:
        self.version, self.names, self.header = version, names, header
        self._present = {name[start:] for name in names for start in range(len(name))}

    def has(self, name: str) -> bool:
        return name in self._present

    def require(self, name: str, owner: str) -> None:
        if not self.has(name):
            raise MissingName(f"TensorRT {self.version} has no {owner}.{name}")


@functools.cache
def api_names(version: str) -> ApiNames:
    lines = (API_DIR / f"tensorrt-{version}.txt").read_text(encoding="ascii").splitlines()
    header = tuple(line for line in lines if line.startswith("#"))
    return ApiNames(version, frozenset(line for line in lines if line and not line.startswith("#")), header)


@dataclass(frozen=True)
class EnumValue:
    enum: str
    member: str

    def __int__(self) -> int:
        return zlib.crc32(self.member.encode()) % 31  # a stable small bit index for flag masks


class FakeEnum:
    """``trt.BuilderFlag`` and friends: every member read is checked; ``Logger`` is also callable."""

    def __init__(self, api: ApiNames, name: str, factory=None) -> None:
        self._api, self._name, self._factory = api, name, factory

    def __getattr__(self, member: str) -> EnumValue:
        if member.startswith("_"):
            raise AttributeError(member)
        self._api.require(member, self._name)
        return EnumValue(self._name, member)

    def __call__(self, *args: Any) -> Any:
        if self._factory is None:
            raise TypeError(f"stand-in {self._name} is not callable")
        return self._factory(*args)


class Strict:
    """Base of the stand-in objects: public attribute reads and writes are checked by name."""

    def __init__(self, world: "FakeTensorRT") -> None:
        object.__setattr__(self, "_world", world)

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_world")._api.require(name, type(self).__name__.removeprefix("Fake"))
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            self._world._api.require(name, type(self).__name__.removeprefix("Fake"))
            self._world.events.append(("set", type(self).__name__, name, value))
        object.__setattr__(self, name, value)


class FakeTensor(Strict):
    def __init__(self, world: "FakeTensorRT", name: str, shape: tuple[int, ...]) -> None:
        super().__init__(world)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", shape)


class FakeLayer(Strict):
    def __init__(self, world: "FakeTensorRT", name: str, kind: str) -> None:
        super().__init__(world)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "type", EnumValue("LayerType", kind))
        object.__setattr__(self, "_precision", None)

    @property
    def precision(self) -> Any:
        return self._precision

    @precision.setter
    def precision(self, value: Any) -> None:
        object.__setattr__(self, "_precision", value)


class FakeNetwork(Strict):
    def __init__(self, world: "FakeTensorRT", flags: int) -> None:
        super().__init__(world)
        object.__setattr__(self, "_flags", flags)
        object.__setattr__(self, "_layers", [FakeLayer(world, name, kind) for name, kind in world.network_layers])

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self._layers[index]

    def get_input(self, index: int) -> FakeTensor:
        return FakeTensor(self._world, "input", self._world.input_shape)


class FakeParser(Strict):
    def __init__(self, world: "FakeTensorRT", network: FakeNetwork, logger: Any) -> None:
        super().__init__(world)

    def parse(self, data: bytes) -> bool:
        self._world.events.append(("parse", len(data)))
        return True

    @property
    def num_errors(self) -> int:
        return 0

    def get_error(self, index: int) -> str:
        return "no error"


class FakeProfile(Strict):
    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self._world.profiles.append((name, tuple(low), tuple(opt), tuple(high)))


class FakeTimingCache(Strict):
    def __init__(self, world: "FakeTensorRT", data: bytes) -> None:
        super().__init__(world)
        object.__setattr__(self, "_data", bytes(data))

    def serialize(self) -> bytes:
        return b"timing-cache:" + self._data


class FakeConfig(Strict):
    def set_memory_pool_limit(self, pool: EnumValue, size: int) -> None:
        self._world.events.append(("pool", pool, size))

    def set_flag(self, flag: EnumValue) -> None:
        assert flag.enum == "BuilderFlag", flag
        self._world.flags.append(flag.member)

    def set_calibration_profile(self, profile: FakeProfile) -> bool:
        self._world.events.append(("calibration_profile",))
        return True

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        return 0

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(self._world, data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self._world.events.append(("timing_cache", cache._data, ignore_mismatch))
        return cache._data != b"from another GPU"


class FakeBuilder(Strict):
    def __init__(self, world: "FakeTensorRT", logger: Any) -> None:
        super().__init__(world)

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self._world.network_flags = flags
        return FakeNetwork(self._world, flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self._world)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile(self._world)

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        calibrator = getattr(config, "int8_calibrator", None) if self._world._api.has("int8_calibrator") else None
        if calibrator is not None:  # TensorRT reads the cache, then asks for batches until None
            self._world.calibration_cache_read = calibrator.read_calibration_cache()
            while calibrator.get_batch(["input"]) is not None:
                self._world.calibration_batches += 1
            calibrator.write_calibration_cache(b"TRT-8601-EntropyCalibration2\ninput: 3c010204\n")
        self._world.events.append(("build",))
        return b"serialized engine"


class FakeInspector(Strict):
    def get_engine_information(self, layer_format: EnumValue) -> str:
        assert layer_format == EnumValue("LayerInformationFormat", "JSON")
        return json.dumps(self._world.inspector)


class FakeContext(Strict):
    def __init__(self, world: "FakeTensorRT") -> None:
        super().__init__(world)
        object.__setattr__(self, "_shapes", {})

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        low, _, high = self._world.profile_shape
        ok = len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high))
        if ok:
            self._shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self._shapes["input"][0], self._world.classes)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self._world.events.append(("address", name, address))
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._world.events.append(("execute", stream_handle))
        return True


class FakeEngine(Strict):
    _io = (("input", "INPUT"), ("logits", "OUTPUT"))

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> EnumValue:
        return EnumValue("TensorIOMode", dict(self._io)[name])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._world.input_shape if name == "input" else (-1, self._world.classes)

    def get_tensor_dtype(self, name: str) -> EnumValue:
        return EnumValue("DataType", "FLOAT")

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> tuple[tuple[int, ...], ...]:
        return self._world.profile_shape

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self._world)

    def create_engine_inspector(self) -> FakeInspector:
        return FakeInspector(self._world)


class FakeRuntime(Strict):
    def __init__(self, world: "FakeTensorRT", logger: Any) -> None:
        super().__init__(world)

    @property
    def num_DLA_cores(self) -> int:
        return self._world.dla_cores

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        self._world.events.append(("deserialize",))
        return FakeEngine(self._world)


@dataclass
class FakeTensorRT:
    """``sys.modules["tensorrt"]`` for one version; module attributes are checked like the rest."""

    version: str
    __version__: str = ""
    input_shape: tuple[int, ...] = (-1, 3, 32, 32)
    classes: int = 4
    network_layers: list[tuple[str, str]] = field(default_factory=lambda: [
        ("/stem/Conv", "CONVOLUTION"), ("/stem/Relu", "ACTIVATION"), ("/block/Conv", "CONVOLUTION"),
        ("/head/Gemm", "MATRIX_MULTIPLY")])
    inspector: dict[str, Any] = field(default_factory=dict)
    profile_shape: tuple[tuple[int, ...], ...] = ((1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32))
    dla_cores: int = 2
    events: list[tuple] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    profiles: list[tuple] = field(default_factory=list)
    network_flags: int | None = None
    calibration_cache_read: Any = None
    calibration_batches: int = 0

    def __post_init__(self) -> None:
        self._api = api_names(self.version)
        self.__version__ = self.__version__ or self.version
        classes = {"Builder": functools.partial(FakeBuilder, self), "OnnxParser": functools.partial(FakeParser, self),
                   "Runtime": functools.partial(FakeRuntime, self), "Logger": lambda *args: ("logger", args)}
        self._classes = {name: FakeEnum(self._api, name, factory) for name, factory in classes.items()}

    def __getattr__(self, name: str) -> Any:  # only for names that are not dataclass fields
        if name.startswith("_"):
            raise AttributeError(name)
        self._api.require(name, "tensorrt")
        if name in self._classes:
            return self._classes[name]
        if name == "nptype":
            return lambda dtype: {"FLOAT": np.float32, "HALF": np.float16}[dtype.member]
        if name == "IInt8EntropyCalibrator2":
            return type(name, (), {"__init__": lambda calibrator: None})
        if name[:1].isupper():
            return FakeEnum(self._api, name)
        raise AttributeError(f"the stand-in has no tensorrt.{name}; add it to tests/tensorrt_api_fake.py")


# --- pycuda.driver -----------------------------------------------------------------------------------


class FakeCudaContext:
    def __init__(self, cuda: "FakeCuda") -> None:
        self._cuda = cuda

    def push(self) -> None:
        self._cuda.stack.append(self)

    def pop(self) -> None:
        assert self._cuda.stack and self._cuda.stack[-1] is self, "popped a context that is not current"
        self._cuda.stack.pop()


class FakeAllocation:
    def __init__(self, cuda: "FakeCuda", nbytes: int) -> None:
        self._cuda, self.nbytes, self.freed = cuda, nbytes, False
        self.address = 0x1000 * (len(cuda.allocations) + 1)
        self.context = cuda.stack[-1] if cuda.stack else None

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        assert not self.freed, "freed twice"
        self.freed = True


class FakeCuda(ModuleType):
    """``pycuda.driver``: one device whose primary context is the only one; allocations and copies
    need a current context (as CUDA's driver API does)."""

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.stack: list[FakeCudaContext] = []
        self.primary = FakeCudaContext(self)
        self.allocations: list[FakeAllocation] = []
        self.copies = 0
        self.initialized = False

    def init(self) -> None:
        self.initialized = True

    def Device(self, index: int) -> "FakeCuda":  # noqa: N802  (pycuda's name)
        assert self.initialized and index == 0
        return self

    def retain_primary_context(self) -> FakeCudaContext:
        return self.primary

    def compute_capability(self) -> tuple[int, int]:
        return 8, 7

    def name(self) -> str:
        return "Orin (stand-in)"

    def get_driver_version(self) -> int:
        return 12020

    def mem_alloc(self, nbytes: int) -> FakeAllocation:
        assert self.stack, "mem_alloc with no current CUDA context"
        self.allocations.append(FakeAllocation(self, nbytes))
        return self.allocations[-1]

    def pagelocked_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    def _copy(self, *args: Any) -> None:
        assert self.stack, "copy with no current CUDA context"
        self.copies += 1

    memcpy_htod = memcpy_htod_async = memcpy_dtoh_async = _copy

    def Stream(self) -> Any:  # noqa: N802
        return type("Stream", (), {"handle": 7})()

    def Event(self) -> Any:  # noqa: N802
        return type("Event", (), {"record": lambda event, stream: None, "synchronize": lambda event: None,
                                  "time_since": lambda event, other: 0.25})()


def install(monkeypatch, version: str, **world: Any) -> tuple[FakeTensorRT, FakeCuda]:
    """Put the stand-ins in sys.modules (``pycuda.autoinit`` made unimportable) for one test."""
    trt, cuda = FakeTensorRT(version, **world), FakeCuda()
    package = ModuleType("pycuda")
    package.driver = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setitem(__import__("sys").modules, "pycuda", package)
    monkeypatch.setitem(__import__("sys").modules, "pycuda.driver", cuda)
    monkeypatch.setitem(__import__("sys").modules, "pycuda.autoinit", None)
    return trt, cuda


# --- small ONNX files of each kind a plan builds from ---------------------------------------------------


def tiny_onnx(path: Path, kind: str = "fp32", batch: int | str = "batch", img_size: int = 32, opset: int = 17) -> Path:
    """Conv stem -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm head, as ``kind``:
    "fp32"; "fp16" (FP16 initializers, Cast in and out); "qdq" (TensorRT Q/DQ: symmetric int8
    around the second Conv, float stem and head, as edge-tl's INT8 export leaves them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dtype = np.float16 if kind == "fp16" else np.float32
    weights = {"stem.w": rng.normal(size=(8, 3, 3, 3)), "block.w": rng.normal(size=(8, 8, 1, 1)),
               "head.w": rng.normal(size=(4, 8)), "head.b": np.zeros(4)}
    inits = [numpy_helper.from_array(value.astype(dtype), name) for name, value in weights.items()]
    nodes, x = [], "input"
    if kind == "fp16":
        nodes.append(helper.make_node("Cast", ["input"], ["x16"], name="/Cast_in", to=TensorProto.FLOAT16))
        x = "x16"
    nodes += [helper.make_node("Conv", [x, "stem.w"], ["s"], name="/stem/Conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["s"], ["r"], name="/stem/Relu")]
    block_in, block_w = "r", "block.w"
    if kind == "qdq":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "act.scale"),
                  numpy_helper.from_array(np.array(0.01, np.float32), "w.scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "zero")]
        nodes += [helper.make_node("QuantizeLinear", ["r", "act.scale", "zero"], ["rq"], name="/block/q_in"),
                  helper.make_node("DequantizeLinear", ["rq", "act.scale", "zero"], ["rd"], name="/block/dq_in"),
                  helper.make_node("QuantizeLinear", ["block.w", "w.scale", "zero"], ["wq"], name="/block/q_w"),
                  helper.make_node("DequantizeLinear", ["wq", "w.scale", "zero"], ["wd"], name="/block/dq_w")]
        block_in, block_w = "rd", "wd"
    nodes += [helper.make_node("Conv", [block_in, block_w], ["c"], name="/block/Conv"),
              helper.make_node("GlobalAveragePool", ["c"], ["p"], name="/pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="/flatten"),
              helper.make_node("Gemm", ["f", "head.w", "head.b"], ["logits16" if kind == "fp16" else "logits"],
                               name="/head/Gemm", transB=1)]
    if kind == "fp16":
        nodes.append(helper.make_node("Cast", ["logits16"], ["logits"], name="/Cast_out", to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, img_size, img_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- engine inspector JSON as TensorRT writes it ------------------------------------------------------

INT8 = "Thirty-two wide channel vectorized row major Int8 format"
HALF = "Channel major FP16 format where channel % 8 == 0"
FP32 = "Row major linear FP32"


def layer_json(name: str, datatype: str) -> dict:
    return {"Name": name, "LayerType": "CaskConvolution", "ParameterType": "Convolution",
            "Inputs": [{"Format/Datatype": datatype}]}


def inspector_for(plan) -> dict:
    """What the inspector reports for a plan's engine built from :func:`tiny_onnx`'s file."""
    if plan.dla_core is not None:
        return {"Layers": [{"Name": "{ForeignNode[/stem/Conv.../head/Gemm]}", "LayerType": "DLA",
                            "Inputs": [{"Format/Datatype": HALF}]}]}
    if plan.expected_precision == "fp16":
        return {"Layers": [layer_json("/stem/Conv + /stem/Relu", HALF), layer_json("/block/Conv", HALF)]}
    stem = FP32 if plan.onnx_kind == "qdq" else INT8  # the Q/DQ file leaves the stem float
    return {"Layers": [layer_json("/stem/Conv + /stem/Relu", stem), layer_json("/block/Conv", INT8),
                       layer_json("/head/Gemm", FP32 if plan.onnx_kind == "qdq" else HALF)]}
