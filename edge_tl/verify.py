"""The verification gate: does a deployable artifact behave like the float model it came from?

``verify(run_dir, artifact)`` runs the artifact (``.onnx`` in ONNX Runtime, ``.engine`` in
TensorRT) and the float PyTorch model of the same stage (the stage named in the artifact's
metadata) on the run's validation split, or on another folder with the same classes, through one
preprocessing: :func:`edge_tl.data.preprocess` with the input size, mean and std the artifact's
metadata declares, checked against run.json first. Both runners see the very same arrays, in
batches. The result (agreement, logit differences, metrics of both, deltas in percentage points,
class flips and the gate decision) is written to ``RUN_DIR/verify/<artifact file name>.json``.

The gate passes when the balanced accuracy drops by at most ``max_drop`` points and the escape
rate (defects predicted as the ok class) rises by at most ``max_escape_rise`` points.
:func:`edge_tl.gate.check_gate` turns a failed result into :class:`~edge_tl.errors.AccuracyRegressionError`
(exit code 1), which is what a release pipeline keys on. :func:`artifact_predictions` is the
loading, preprocessing and batching on its own: an artifact's logits (and, when asked, its float
model's) with the labels, for whoever needs an artifact's accuracy without the gate.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.errors import ArtifactError, ConfigError, DatasetError
from edge_tl.gate import (
    DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE, TRAIN_SPLIT, check_gate_settings, gate_record,
    label_free_evidence,
)
from edge_tl.metrics import classification_metrics
from edge_tl.run_lock import run_lock
from edge_tl.runners.base import Runner

logger = logging.getLogger(__name__)

ARTIFACT_SUFFIXES = (".onnx", ".engine")
REQUIRED_METADATA = ("stage", "input_size", "mean", "std", "class_names", "input_name", "output_name")
DEFAULT_BATCH_SIZE = 32
# deltas are differences of ratios times 100; a drop of exactly max_drop must not fail on rounding
POINTS_TOLERANCE = 1e-9


def verify_path(run_dir: str | os.PathLike, artifact: str | os.PathLike) -> Path:
    return Path(run_dir) / "verify" / f"{Path(artifact).name}.json"


def artifact_metadata(artifact: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing metadata of an ONNX file (its metadata_props) or engine (its manifest)."""
    artifact = Path(artifact)
    if artifact.suffix == ".onnx":
        from export.onnx_metadata import read_onnx_metadata

        try:
            return read_onnx_metadata(artifact)
        except Exception as err:  # onnx raises DecodeError and friends for a file that is not ONNX
            raise ArtifactError(f"{artifact} is not a readable ONNX file ({err}); re-export it") from err
    from export.tensorrt_build import manifest_path

    metadata = read_json(manifest_path(artifact)).get("metadata")
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{manifest_path(artifact)} has no preprocessing metadata; rebuild the engine with `edge-tl export`")
    return metadata


def check_metadata(metadata: dict[str, Any], run_info: dict[str, Any], artifact: str | os.PathLike,
                   source: str = "the run", fix: str = "re-export it from this run") -> None:
    """The artifact must declare the run's (or a pack's) input size, mean, std, classes, ok class and crop."""
    name = Path(artifact).name
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ArtifactError(f"{name} metadata lacks {', '.join(missing)}; re-export it with `edge-tl export`")
    if metadata["stage"] not in ("float", "pruned"):
        raise ArtifactError(f"{name} metadata names stage {metadata['stage']!r}, not float or pruned; re-export it")
    size = run_info["img_size"]
    checks = (
        ("input size", list(metadata["input_size"]), [size, size], lambda a, b: a == b),
        ("mean", metadata["mean"], run_info["mean"], lambda a, b: np.allclose(a, b, rtol=0, atol=1e-7)),
        ("std", metadata["std"], run_info["std"], lambda a, b: np.allclose(a, b, rtol=0, atol=1e-7)),
        ("classes", list(metadata["class_names"]), list(run_info["classes"]), lambda a, b: a == b),
        ("ok class", metadata.get("ok_class"), run_info.get("ok_class"), lambda a, b: a == b),
        ("centre crop", float(metadata.get("crop", 1.0)), data_mod.run_crop(run_info), lambda a, b: a == b),
    )
    for label, declared, expected, same in checks:
        if len(np.atleast_1d(declared)) != len(np.atleast_1d(expected)) or not same(declared, expected):
            raise ArtifactError(
                f"{name} declares {label} {declared!r} but {source} has {expected!r}; it was exported from another run, "
                f"{fix}"
            )


def artifact_manifest(artifact: str | os.PathLike) -> dict[str, Any]:
    """The manifest beside an artifact (``X.onnx.json``, ``X.engine.manifest.json``), ``{}`` when absent."""
    artifact = Path(artifact)
    path = Path(f"{artifact}.json") if artifact.suffix == ".onnx" else Path(f"{artifact}.manifest.json")
    return read_json(path) if path.is_file() else {}


def check_run_pairing(artifact: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """An artifact whose manifest names another run.json (by sha256) is not this run's: refuse it."""
    recorded = artifact_manifest(artifact).get("run_json_sha256")
    if recorded and recorded != sha256_file(Path(run_dir) / "run.json"):
        raise ArtifactError(
            f"{Path(artifact).name} was exported from another run (its manifest's run.json sha256 differs from "
            f"{Path(run_dir) / 'run.json'}); re-export it, or rebuild the engine, from this run"
        )


def _records(run_info: dict[str, Any], data_dir: str | os.PathLike | None) -> tuple[list, str]:
    if data_dir is None:
        from edge_tl.finetune import run_records

        return run_records(run_info, "val"), "validation split"
    scan = data_mod.scan_image_folder(data_dir)
    if list(scan.classes) != list(run_info["classes"]):
        raise DatasetError(
            f"{data_dir} has classes {', '.join(scan.classes)} but the run has {', '.join(run_info['classes'])}; "
            "verify on a folder with the same class folders"
        )
    return list(scan.records), str(Path(data_dir))


def artifact_runner(artifact: Path) -> tuple[Runner, str, int | None]:
    """(runner, backend name, largest batch the artifact takes or None for any)."""
    if artifact.suffix == ".onnx":
        from edge_tl.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(artifact), "onnxruntime", None
    from edge_tl.runners.tensorrt_runner import TensorRTRunner
    from export.tensorrt_build import manifest_path

    settings = read_json(manifest_path(artifact)).get("settings", {})
    return TensorRTRunner(artifact), "tensorrt", int(settings.get("max_batch", 1))


def batch_plan(runner: Runner, input_name: str, batch_size: int, max_batch: int | None) -> tuple[int, bool]:
    """(images per call, whether every call must be exactly that size) for the active runner."""
    specs = runner.input_specs()
    if input_name not in specs:
        raise ArtifactError(f"{runner.name} has inputs {sorted(specs)}, its metadata names {input_name!r}; re-export it")
    fixed = specs[input_name].shape[0]
    if fixed is not None:
        return fixed, True
    return min(batch_size, max_batch) if max_batch else batch_size, False


def run_batches(runner: Runner, images: np.ndarray, input_name: str, output_name: str, size: int,
                exact: bool) -> np.ndarray:
    outputs = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        count = len(chunk)
        if exact and count < size:  # a static-batch artifact: pad with the last image, drop its outputs
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, axis=0)])
        result = runner.infer({input_name: np.ascontiguousarray(chunk)})
        if output_name not in result:
            raise ArtifactError(f"{runner.name} has outputs {sorted(result)}, its metadata names {output_name!r}; re-export it")
        outputs.append(np.asarray(result[output_name], dtype=np.float32)[:count])
    return np.concatenate(outputs)


def _load_images(records: Sequence, img_size: int, mean, std, crop: float) -> np.ndarray:
    batch = np.empty((len(records), 3, img_size, img_size), dtype=np.float32)
    for index, record in enumerate(records):
        batch[index] = data_mod.preprocess(data_mod.load_image(record.path), img_size, mean, std, crop)
    return batch


def image_batches(records: Sequence, metadata: dict[str, Any], batch_size: int) -> Iterator[np.ndarray]:
    """The records decoded and preprocessed as ``metadata`` declares, ``batch_size`` images at a time."""
    img_size = int(metadata["input_size"][0])
    for start in range(0, len(records), batch_size):
        yield _load_images(records[start:start + batch_size], img_size, metadata["mean"], metadata["std"],
                           float(metadata.get("crop", 1.0)))


def _stage_reference(run_dir: Path, stage: str, img_size: int, input_name: str = "input", output_name: str = "logits"):
    from edge_tl.prune_stage import load_stage_model
    from edge_tl.runners.torch_runner import TorchRunner

    return TorchRunner(load_stage_model(run_dir, stage)[0], img_size, input_name, output_name)


def float_logits(run_dir: str | os.PathLike, stage: str, records: Sequence, batch_size: int = DEFAULT_BATCH_SIZE
                 ) -> np.ndarray:
    """The float PyTorch model's logits of ``stage`` on ``records``, preprocessed as the run says:
    what :func:`verify` compares an artifact with, and what a verification pack stores."""
    run_info = read_json(Path(run_dir) / "run.json")
    metadata = {"input_size": [run_info["img_size"]] * 2, "mean": run_info["mean"], "std": run_info["std"],
                "crop": data_mod.run_crop(run_info)}
    reference = _stage_reference(Path(run_dir), stage, int(run_info["img_size"]))
    with reference:
        return np.concatenate([run_batches(reference, images, "input", "logits", batch_size, False)
                               for images in image_batches(records, metadata, batch_size)])


@dataclass(frozen=True)
class ArtifactPredictions:
    """An artifact's logits over labelled images, and its float model's when asked for. ``data``:
    "validation split" or the folder; ``stage`` and ``precision``: from the artifact's metadata."""

    artifact: str
    backend: str
    stage: str
    precision: str | None
    data: str
    classes: list[str]
    ok_class: str | None
    labels: list[int]
    logits: np.ndarray
    float_logits: np.ndarray | None = None

    def metrics(self) -> dict[str, Any]:
        """The artifact's :func:`~edge_tl.metrics.classification_metrics` over these images."""
        return classification_metrics(self.labels, self.logits.argmax(1), self.classes, self.ok_class)


def artifact_predictions(
    run_dir: str | os.PathLike,
    artifact: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    with_float: bool = False,
) -> ArtifactPredictions:
    """Run ``artifact`` on the run's validation split (or ``data_dir``, with the run's classes) after
    checking its metadata against run.json; ``with_float`` also runs the float PyTorch model of the
    artifact's stage on the very same arrays. Images are decoded once, ``batch_size`` at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r} must be an integer >= 1, e.g. {DEFAULT_BATCH_SIZE}")
    run_dir, artifact = Path(run_dir), Path(artifact)
    if artifact.suffix not in ARTIFACT_SUFFIXES:
        raise ConfigError(f"artifact {artifact.name} is neither .onnx nor .engine; pass a file from {run_dir / 'export'}")
    if not artifact.is_file():
        raise ArtifactError(f"artifact {artifact} does not exist; create it with `edge-tl export {run_dir}`")
    run_info = read_json(run_dir / "run.json")
    metadata = artifact_metadata(artifact)
    check_metadata(metadata, run_info, artifact)
    check_run_pairing(artifact, run_dir)
    records, data_label = _records(run_info, data_dir)
    if not records:
        raise DatasetError(f"no images to verify on in {data_label}; pass --data DIR with images of every class")
    backend, logits, reference_logits = paired_logits(run_dir, artifact, metadata, records, batch_size, with_float)
    return ArtifactPredictions(
        artifact.name, backend, metadata["stage"], metadata.get("precision"), data_label, list(run_info["classes"]),
        run_info.get("ok_class"), [record.label for record in records], logits, reference_logits,
    )


def paired_logits(run_dir: Path, artifact: Path, metadata: dict[str, Any], records: Sequence, batch_size: int,
                  with_float: bool = True) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(backend, the artifact's logits, the float model's or None) on ``records``, each image decoded
    once and fed to both runners."""
    input_name, output_name = metadata["input_name"], metadata["output_name"]
    reference = (_stage_reference(run_dir, metadata["stage"], int(metadata["input_size"][0]), input_name, output_name)
                 if with_float else None)
    runner, backend, max_batch = artifact_runner(artifact)
    artifact_parts, float_parts = [], []
    with runner, reference or nullcontext():
        size, exact = batch_plan(runner, input_name, batch_size, max_batch)
        for images in image_batches(records, metadata, batch_size):
            artifact_parts.append(run_batches(runner, images, input_name, output_name, size, exact))
            if reference is not None:
                float_parts.append(run_batches(reference, images, input_name, output_name, batch_size, False))
    return backend, np.concatenate(artifact_parts), np.concatenate(float_parts) if float_parts else None


def compare(float_logits: np.ndarray, artifact_logits: np.ndarray, labels: Sequence[int], classes: Sequence[str],
            ok_class: str | None, max_drop: float, max_escape_rise: float, confidence: float = DEFAULT_CONFIDENCE,
            label_free=None) -> dict[str, Any]:
    """The gate numbers for two sets of logits over the same labelled samples (pure, no I/O): point
    metrics of both, deltas in points, flips, and the verdict with its paired statistics
    (:func:`edge_tl.gate.gate_record`; ``label_free`` from :func:`edge_tl.gate.label_free_evidence`)."""
    classes = list(classes)
    float_pred, artifact_pred = float_logits.argmax(1), artifact_logits.argmax(1)
    reference = classification_metrics(labels, float_pred, classes, ok_class)
    metrics = classification_metrics(labels, artifact_pred, classes, ok_class)
    diff = np.abs(artifact_logits.astype(np.float64) - float_logits.astype(np.float64))
    flips = Counter(f"{classes[f]}->{classes[a]}" for f, a in zip(float_pred, artifact_pred) if f != a)
    delta = 100.0 * (metrics["balanced_accuracy"] - reference["balanced_accuracy"])
    result: dict[str, Any] = {
        "num_samples": int(len(labels)),
        "top1_agreement": float(np.mean(float_pred == artifact_pred)) if len(labels) else 0.0,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "float_accuracy": reference["accuracy"],
        "float_balanced_accuracy": reference["balanced_accuracy"],
        "balanced_accuracy_delta": delta,
    }
    if ok_class is not None:
        rise = 100.0 * (metrics["escape_rate"] - reference["escape_rate"])
        result.update({"ok_class": ok_class, "escape_rate": metrics["escape_rate"],
                       "float_escape_rate": reference["escape_rate"], "escape_rate_delta": rise})
    result.update({
        "flips": dict(sorted(flips.items(), key=lambda item: (-item[1], item[0]))),
        "confusion_matrix": metrics["confusion_matrix"],
        "float_confusion_matrix": reference["confusion_matrix"],
        "max_drop": float(max_drop), "max_escape_rise": float(max_escape_rise),
        **gate_record(labels, float_pred, artifact_pred, classes, ok_class, max_drop, max_escape_rise, confidence,
                      None if label_free is None else label_free[0]),
    })
    if label_free is not None:
        result["unlabelled"] = label_free[1]
    return result


def verify(
    run_dir: str | os.PathLike,
    artifact: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    max_escape_rise: float = DEFAULT_MAX_ESCAPE_RISE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    confidence: float = DEFAULT_CONFIDENCE,
    unlabelled: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compare ``artifact`` with the float model of its stage; write and return the result.

    ``max_drop`` and ``max_escape_rise`` are in percentage points; ``confidence`` is the two-sided
    level of the intervals. ``unlabelled``: a folder of images without labels, or ``"train"`` (the
    run's training split), for label-free evidence. A FAIL or INCONCLUSIVE verdict is a result, not
    an exception: call :func:`edge_tl.gate.check_gate` to raise it.
    """
    check_gate_settings(max_drop, max_escape_rise, confidence)
    with run_lock(run_dir):  # it writes RUN_DIR/verify
        return _verify(Path(run_dir), Path(artifact), data_dir, max_drop, max_escape_rise, batch_size, confidence,
                       unlabelled)


def _verify(run_dir: Path, artifact: Path, data_dir, max_drop: float, max_escape_rise: float, batch_size: int,
            confidence: float, unlabelled) -> dict[str, Any]:
    predictions = artifact_predictions(run_dir, artifact, data_dir, batch_size, with_float=True)
    artifact = Path(artifact)
    label_free = None
    if unlabelled is not None:
        records, source = unlabelled_records(run_dir, unlabelled)
        known = _pack_float_predictions(Path(run_dir), predictions.stage) if source == TRAIN_SPLIT else None
        _, logits, reference = paired_logits(Path(run_dir), artifact, artifact_metadata(artifact), records, batch_size,
                                             with_float=known is None)
        float_pred = known if known is not None else reference.argmax(1)
        label_free = label_free_evidence(float_pred, logits.argmax(1), predictions.classes, predictions.ok_class,
                                         source)
    result = {
        "artifact": predictions.artifact, "artifact_sha256": sha256_file(artifact), "backend": predictions.backend,
        "stage": predictions.stage, "precision": predictions.precision, "data": predictions.data,
        "classes": predictions.classes,
        **compare(predictions.float_logits, predictions.logits, predictions.labels, predictions.classes,
                  predictions.ok_class, max_drop, max_escape_rise, confidence, label_free),
    }
    atomic_write_json(verify_path(run_dir, artifact), result)
    logger.info("%s vs float %s model on %d images: agreement %.4f, balanced accuracy %+.2f points -> %s",
                artifact.name, result["stage"], result["num_samples"], result["top1_agreement"],
                result["balanced_accuracy_delta"], result["verdict"])
    return result


def _pack_float_predictions(run_dir: Path, stage: str) -> np.ndarray | None:
    """The float model's training-split predictions from the stage's verification pack when it is current
    (same run.json and weights, same split): the very computation, done once per stage at export."""
    from edge_tl.pack_format import pack_path, pack_records, pack_sources, read_pack

    path = pack_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        pack = read_pack(path)
    except ArtifactError:
        return None
    run_info = read_json(run_dir / "run.json")
    train_files = run_info["split"]["train_files"]
    if pack.sources != pack_sources(run_dir, stage) or list(pack.unlabelled_files) != list(train_files):
        return None
    try:  # the images themselves unchanged too: the device's own check of them
        pack_records(pack, run_info["data_dir"], unlabelled=True)
    except DatasetError:
        return None
    return np.asarray(pack.unlabelled_float_pred)


def unlabelled_records(run_dir: str | os.PathLike, source: str | os.PathLike) -> tuple[list, str]:
    """(records, source label) of the images without labels: the run's training split for ``"train"``,
    else every image under the folder (labels unused)."""
    if str(source) == TRAIN_SPLIT:
        from edge_tl.finetune import run_records

        return run_records(read_json(Path(run_dir) / "run.json"), "train"), TRAIN_SPLIT
    paths = data_mod.collect_images([source])
    return [data_mod.ImageRecord(path, 0) for path in paths], str(source)
