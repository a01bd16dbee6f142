"""TensorRT implicit-INT8 calibration cache (the file ``IInt8EntropyCalibrator2`` reads and writes).

TensorRT 8.x-10.x read this text format; TensorRT 11 dropped implicit INT8 (it builds from the
Q/DQ ONNX instead). Layout, one record per line::

    TRT-8601-EntropyCalibration2
    input: 3c010204
    /trunk/blocks/0/0/Conv_output_0: 3d2a8c1b

- Header: ``TRT-<version tag>-<algorithm>``. The tag is TensorRT's ``NV_TENSORRT_VERSION``:
  ``major*1000 + minor*100 + patch`` before 10 (8.6.1 -> 8601), ``major*10000 + minor*100 +
  patch`` from 10 on (10.3.0 -> 100300). TensorRT ignores a cache from another version and
  calibrates again, so write the tag of the TensorRT on the target device (the JetPack's).
- Each other line: ``<tensor name>: <scale>``, the scale as the hexadecimal IEEE-754 bit pattern
  of a float32 (big-endian digit order, i.e. ``struct.pack('>f', s).hex()``). TensorRT's scale is
  symmetric: ``scale = absmax / 127``, dynamic range ``[-127 * scale, 127 * scale]``.
- Tensor names are those of the TensorRT network, which the ONNX parser takes from the ONNX value
  names; a name may contain spaces or colons, so the scale is the text after the last ``": "``.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from calibrate.ranges import INT8_MAX, float32
from edge_tl.artifacts import atomic_write_text
from edge_tl.errors import ArtifactError, ConfigError

DEFAULT_ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


@dataclass(frozen=True)
class TensorRTCache:
    version_tag: int
    algorithm: str
    scales: dict[str, float]


def tensorrt_version_tag(version: str) -> int:
    """TensorRT's NV_TENSORRT_VERSION for a version string: '8.6.1' -> 8601, '10.3.0' -> 100300."""
    parts = str(version).split(".")
    try:
        major, minor, patch = (int(part) for part in (parts + ["0", "0"])[:3])
    except ValueError:
        raise ConfigError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR.PATCH (e.g. 8.6.1)") from None
    if not (0 <= minor < 100 and 0 <= patch < 100):
        raise ConfigError(f"TensorRT version {version!r} has a minor or patch number outside 0-99")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """Big-endian hex of the float32 bit pattern: 0.0078125 -> '3c000000'."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]


def scales_from_ranges(ranges: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Symmetric TensorRT scales ``max(|min|, |max|) / 127`` (float32) for tensor ranges."""
    scales = {}
    for name, (low, high) in ranges.items():
        absmax = max(abs(float(low)), abs(float(high)))
        scales[name] = float32(absmax / INT8_MAX)
    return scales


def format_calibration_cache(scales: Mapping[str, float], trt_version: str, algorithm: str = DEFAULT_ALGORITHM) -> str:
    tag = tensorrt_version_tag(trt_version)
    lines = [f"TRT-{tag}-{algorithm}"]
    for name, scale in scales.items():
        if "\n" in name or not name:
            raise ConfigError(f"tensor name {name!r} cannot be written to a TensorRT cache (empty or multi-line)")
        scale = float(scale)
        if not np.isfinite(scale) or scale < 0:
            raise ConfigError(f"scale {scale} of tensor {name!r} must be finite and >= 0")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(
    path: str | os.PathLike, scales: Mapping[str, float], trt_version: str, algorithm: str = DEFAULT_ALGORITHM
) -> None:
    """Write a TensorRT calibration cache atomically (scales are stored as float32)."""
    atomic_write_text(path, format_calibration_cache(scales, trt_version, algorithm))


def parse_calibration_cache(text: str, source: str = "calibration cache") -> TensorRTCache:
    lines = [line.rstrip("\r") for line in text.split("\n")]
    header = _HEADER.match(lines[0].strip()) if lines else None
    if header is None:
        raise ArtifactError(
            f"{source} does not start with a 'TRT-<version>-<algorithm>' line; it is not a TensorRT calibration cache"
        )
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        value = value.strip()
        if not sep or not name or not _HEX.match(value):
            raise ArtifactError(f"{source} line {number} {line!r} is not '<tensor>: <hex float32>'; regenerate the cache")
        scales[name] = hex_to_scale(value)
    return TensorRTCache(int(header.group(1)), header.group(2), scales)


def read_calibration_cache(path: str | os.PathLike) -> TensorRTCache:
    """Read a TensorRT calibration cache; ArtifactError on a malformed file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"TensorRT calibration cache {path} does not exist; write it with `edge-tl export`") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not a text TensorRT calibration cache") from None
    return parse_calibration_cache(text, source=str(path))
