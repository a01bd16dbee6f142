"""ONNX metadata and ONNX Runtime sessions: the part of the ONNX export the device side needs.

Every exported ONNX file carries its preprocessing (input size, mean, std, crop, classes, ok class,
stage, precision) as ``metadata_props``, each value JSON-encoded; any runtime, on the device too,
feeds the model from these alone. This module imports onnx and onnxruntime only (no torch), so the
light device install can read and run what the training side exported.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from edge_tl.errors import ConfigError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
REQUIRED_METADATA = ("mean", "std", "class_names")


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


def ort_session(model_or_path, threads: int = 1):
    """A CPU ONNX Runtime session for a ModelProto or a file, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
