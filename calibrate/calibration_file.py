"""``calibration.json``: the quantization parameters of every quantized tensor of one model.

Written by the quantize stage (``RUN_DIR/quantized/<stage>/calibration.json``), read by the Q/DQ
ONNX builder and the TensorRT cache writer. Specification (also in ``calibrate/FORMAT.md``)::

    {
      "format": "edge-tl-calibration",
      "version": 1,
      "model": {"stage": "float"|"pruned", "img_size": 224, "input_name": "input",
                "float_modules": ["head"], ...},
      "method": "minmax"|"percentile"|"entropy",
      "calibration_files_hash": "<sha256 of the calibration file list>",
      "tensors": [
        {"name": "trunk.blocks.1.body.0:input", "module": "trunk.blocks.1.body.0",
         "kind": "activation", "dtype": "uint8", "axis": null,
         "scale": 0.0235, "zero_point": 0, "min": 0.0, "max": 6.0},
        {"name": "trunk.blocks.1.body.0:weight", "module": "trunk.blocks.1.body.0",
         "kind": "weight", "dtype": "int8", "axis": 0,
         "scale": [0.01, ...], "zero_point": [0, ...], "min": [-1.27, ...], "max": [1.27, ...]}
      ]
    }

- ``module`` is a name from ``named_modules()`` of the BN-folded PyTorch model
  (:func:`edge_tl.fold.fold_batchnorm`); ``name`` is ``<module>:input``, ``<module>:output`` or
  ``<module>:weight``.
- Activations: per-tensor (``axis`` null), ``uint8`` with a zero point in [0, 255] (or ``int8``
  with zero point 0); ``min``/``max`` is the calibrated range the scale was computed from
  (``scale = (max - min) / 255`` after widening the range to include 0).
- Weights: per output channel (``axis`` 0), symmetric ``int8``, every zero point 0,
  ``scale[c] = max(|min[c]|, |max[c]|) / 127`` (``>=`` after weight reconstruction, whose weights
  lie exactly on their grids); lists have one entry per output channel.
- Scales are positive, finite float32 values; a dequantized value is ``(q - zero_point) * scale``.
- A Conv2d/Linear with no entry at all stays float in the export (no weight Q/DQ, no Q/DQ of its
  own on its input or output); one with activation entries but no ``:weight`` entry keeps float
  weights. ``model.float_modules`` (optional, a list of module names) names the modules left
  float on purpose, e.g. the classifier head; none of them may have an entry.
- Optional keys: ``observed_min``/``observed_max`` (activations), any extra keys in ``model``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from calibrate.ranges import RANGE_METHODS, UINT8_MAX, asymmetric_uint8, per_channel_symmetric_int8_scales
from edge_tl.artifacts import atomic_write_json, read_json
from edge_tl.errors import ArtifactError

FORMAT_NAME = "edge-tl-calibration"
FORMAT_VERSION = 1
ROLES = ("input", "output", "weight")
_DTYPE_LIMITS = {"uint8": (0, UINT8_MAX), "int8": (-128, 127)}


@dataclass(frozen=True)
class CalibrationTensor:
    """Quantization parameters of one tensor. Per-channel fields are tuples, per-tensor ones scalars."""

    module: str
    role: str  # input | output | weight
    dtype: str
    axis: int | None
    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...]
    min: float | tuple[float, ...]
    max: float | tuple[float, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.module}:{self.role}"

    @property
    def kind(self) -> str:
        return "weight" if self.role == "weight" else "activation"

    @classmethod
    def activation(cls, module: str, role: str, min_value: float, max_value: float, **extra: Any) -> "CalibrationTensor":
        """A per-tensor uint8 activation with the asymmetric scale/zero point of ``[min, max]``."""
        scale, zero_point = asymmetric_uint8(min_value, max_value)
        return cls(module, role, "uint8", None, scale, zero_point, float(min_value), float(max_value), dict(extra))

    @classmethod
    def weight(cls, module: str, weight: np.ndarray, scales: np.ndarray | None = None) -> "CalibrationTensor":
        """Per-output-channel symmetric int8 parameters of ``weight`` (its exact min/max); ``scales``
        defaults to max(|min|, |max|) / 127 and is given for weights already on their int8 grids."""
        weight = np.asarray(weight, dtype=np.float32)
        flat = weight.reshape(weight.shape[0], -1)
        if scales is None:
            scales = per_channel_symmetric_int8_scales(weight, axis=0)
        return cls(
            module, "weight", "int8", 0, tuple(float(s) for s in scales), (0,) * len(scales),
            tuple(float(v) for v in flat.min(axis=1)), tuple(float(v) for v in flat.max(axis=1)),
        )

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 scale, zero point) arrays; 0-d for per-tensor parameters."""
        dtype = np.uint8 if self.dtype == "uint8" else np.int8
        return np.asarray(self.scale, dtype=np.float32), np.asarray(self.zero_point, dtype=dtype)

    def to_json(self) -> dict[str, Any]:
        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {
            "name": self.name, "module": self.module, "kind": self.kind, "dtype": self.dtype,
            "axis": self.axis, "scale": plain(self.scale), "zero_point": plain(self.zero_point),
            "min": plain(self.min), "max": plain(self.max), **dict(self.extra),
        }


@dataclass(frozen=True)
class Calibration:
    """A whole calibration.json: model description, method, file-list hash and tensors."""

    model: Mapping[str, Any]
    method: str
    calibration_files_hash: str
    tensors: tuple[CalibrationTensor, ...]

    def __post_init__(self) -> None:
        names = [tensor.name for tensor in self.tensors]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ArtifactError(f"calibration has duplicate tensors {duplicates[:5]}; each tensor may appear once")
        listed = self.model.get("float_modules", [])
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise ArtifactError(f"model.float_modules {listed!r} must be a list of module names")
        clashing = sorted({tensor.name for tensor in self.tensors if tensor.module in listed})
        if clashing:
            raise ArtifactError(f"tensors {clashing[:5]} belong to modules listed as float in model.float_modules; "
                                "a float module has no entry")

    @property
    def float_modules(self) -> tuple[str, ...]:
        """Modules left float on purpose (``model.float_modules``; empty for files that predate it)."""
        return tuple(self.model.get("float_modules", ()))

    def get(self, module: str, role: str) -> CalibrationTensor | None:
        for tensor in self.tensors:
            if tensor.module == module and tensor.role == role:
                return tensor
        return None

    def by_name(self) -> dict[str, CalibrationTensor]:
        return {tensor.name: tensor for tensor in self.tensors}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model": dict(self.model),
            "method": self.method, "calibration_files_hash": self.calibration_files_hash,
            "tensors": [tensor.to_json() for tensor in self.tensors],
        }


def write_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
    """Validate and write ``calibration`` atomically."""
    document = calibration.to_json()
    parse_calibration(document, source=str(path))  # never write a file the reader would reject
    atomic_write_json(path, document)


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read and validate a calibration.json; ArtifactError names the first problem."""
    return parse_calibration(read_json(path), source=str(path))


def _fail(source: str, what: str) -> None:
    raise ArtifactError(f"{source}: {what}; regenerate it with `edge-tl quantize`")


def _numbers(value: Any, per_channel: bool, kind: type, source: str, label: str) -> Any:
    values = value if per_channel else [value]
    if per_channel and not isinstance(value, list):
        _fail(source, f"{label} must be a list for a per-channel tensor, got {value!r}")
    if not per_channel and isinstance(value, list):
        _fail(source, f"{label} must be a number for a per-tensor tensor, got a list")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            _fail(source, f"{label} holds {item!r}, not a finite number")
        if kind is int and item != int(item):
            _fail(source, f"{label} holds {item!r}, not an integer")
    converted = [kind(item) for item in values]
    return tuple(converted) if per_channel else converted[0]


def _parse_tensor(entry: Any, source: str) -> CalibrationTensor:
    if not isinstance(entry, dict):
        _fail(source, f"tensor entry {entry!r} is not an object")
    required = ("name", "module", "kind", "dtype", "axis", "scale", "zero_point", "min", "max")
    missing = [key for key in required if key not in entry]
    label = f"tensor {entry.get('name', '?')!r}"
    if missing:
        _fail(source, f"{label} lacks {', '.join(missing)}")
    module, name = entry["module"], entry["name"]
    role = name.rpartition(":")[2] if isinstance(name, str) else None
    if not isinstance(module, str) or name != f"{module}:{role}" or role not in ROLES:
        _fail(source, f"{label}: name must be '<module>:input|output|weight' with module {module!r}")
    kind = "weight" if role == "weight" else "activation"
    if entry["kind"] != kind:
        _fail(source, f"{label}: kind {entry['kind']!r} does not match its name (expected {kind!r})")
    dtype, axis = entry["dtype"], entry["axis"]
    if dtype not in _DTYPE_LIMITS:
        _fail(source, f"{label}: dtype {dtype!r} is not one of {', '.join(_DTYPE_LIMITS)}")
    if kind == "weight" and (dtype != "int8" or axis != 0):
        _fail(source, f"{label}: weights must be per-channel symmetric int8 with axis 0, got {dtype} axis {axis}")
    if kind == "activation" and axis is not None:
        _fail(source, f"{label}: activations are per-tensor, axis must be null, got {axis!r}")
    per_channel = axis is not None
    scale = _numbers(entry["scale"], per_channel, float, source, f"{label} scale")
    zero_point = _numbers(entry["zero_point"], per_channel, int, source, f"{label} zero_point")
    low = _numbers(entry["min"], per_channel, float, source, f"{label} min")
    high = _numbers(entry["max"], per_channel, float, source, f"{label} max")
    scales, zero_points, lows, highs = (v if per_channel else (v,) for v in (scale, zero_point, low, high))
    if per_channel and not len(scales) == len(zero_points) == len(lows) == len(highs) > 0:
        _fail(source, f"{label}: scale, zero_point, min and max must have the same non-zero length")
    if any(s <= 0 for s in scales):
        _fail(source, f"{label}: scales must be > 0")
    if any(lo > hi for lo, hi in zip(lows, highs)):
        _fail(source, f"{label}: min is greater than max")
    qmin, qmax = _DTYPE_LIMITS[dtype]
    if any(not qmin <= zp <= qmax for zp in zero_points) or (dtype == "int8" and any(zero_points)):
        _fail(source, f"{label}: zero points must be 0 for int8 and within [{qmin}, {qmax}] for {dtype}")
    extra = {key: value for key, value in entry.items() if key not in required}
    return CalibrationTensor(module, role, dtype, axis, scale, zero_point, low, high, extra)


def parse_calibration(document: Any, source: str = "calibration.json") -> Calibration:
    """Validate a loaded calibration.json document (see the module docstring for the format)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        _fail(source, f"not an {FORMAT_NAME} file (missing or wrong 'format')")
    if document.get("version") != FORMAT_VERSION:
        _fail(source, f"version {document.get('version')!r} is not supported (this edge-tl reads {FORMAT_VERSION})")
    for key, kind in (("model", dict), ("method", str), ("calibration_files_hash", str), ("tensors", list)):
        if not isinstance(document.get(key), kind):
            _fail(source, f"'{key}' is missing or not a {kind.__name__}")
    if document["method"] not in RANGE_METHODS:
        _fail(source, f"method {document['method']!r} is not one of {', '.join(RANGE_METHODS)}")
    tensors = tuple(_parse_tensor(entry, source) for entry in document["tensors"])
    try:
        return Calibration(dict(document["model"]), document["method"], document["calibration_files_hash"], tensors)
    except ArtifactError as err:
        raise ArtifactError(f"{source}: {err}") from None

