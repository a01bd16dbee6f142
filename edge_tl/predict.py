"""Predictions on unlabelled images: a deployable artifact (ONNX, TensorRT engine) or a run's PyTorch model.

This is the reference for what the line computes: the artifact's own metadata (input size, mean,
std, centre crop, class names, ok class) decides the preprocessing, exactly as ``verify`` feeds it,
so a line integration can be checked image by image against these numbers. Files that cannot be
decoded are listed and skipped (``strict``: an error).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_tl import data as data_mod
from edge_tl.data import collect_images
from edge_tl.artifacts import atomic_write_json, atomic_write_text, read_json
from edge_tl.errors import ArtifactError, ConfigError, DatasetError

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".json")
DEFAULT_BATCH_SIZE = 8


@dataclass
class PredictResult:
    """One row per decoded image (file, predicted class, its probability, the ok class's), and the skipped files."""

    target: str
    backend: str
    classes: list[str]
    ok_class: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found = {name: 0 for name in self.classes}
        for row in self.rows:
            found[row["predicted"]] += 1
        return found


def _target(target: Path) -> tuple[Any, str, dict[str, Any], int | None]:
    """(runner, backend, preprocessing metadata, largest batch or None) for an artifact or a run directory."""
    from edge_tl.verify import artifact_metadata, artifact_runner

    if target.is_dir():
        if not (target / "run.json").is_file():
            raise ArtifactError(f"{target} has no run.json; pass a run directory from `edge-tl finetune` or an "
                                ".onnx / .engine artifact")
        from edge_tl.install_profile import require_training_side

        require_training_side("predict RUN_DIR")
        from edge_tl.prune_stage import load_stage_model
        from edge_tl.runners.torch_runner import TorchRunner

        info = read_json(target / "run.json")
        metadata = {"input_size": [info["img_size"]] * 2, "mean": info["mean"], "std": info["std"],
                    "crop": data_mod.run_crop(info), "class_names": info["classes"], "ok_class": info.get("ok_class"),
                    "input_name": "input", "output_name": "logits"}
        model = load_stage_model(target, "float")[0]
        return TorchRunner(model, info["img_size"], "input", "logits"), "torch", metadata, None
    if not target.exists():
        raise ArtifactError(f"{target} does not exist; pass a run directory from `edge-tl finetune` or an .onnx / "
                            ".engine artifact from `edge-tl export`")
    if target.suffix not in (".onnx", ".engine"):
        raise ConfigError(f"{target.name} is neither a run directory nor an .onnx / .engine artifact")
    runner, backend, max_batch = artifact_runner(target)
    return runner, backend, artifact_metadata(target), max_batch


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def _decoded(paths: Sequence[Path], size: int, metadata: dict, strict: bool, skipped: list) -> tuple[list, np.ndarray]:
    kept, arrays = [], []
    for path in paths:
        try:
            image = data_mod.load_image(path)
        except DatasetError as err:
            if strict:
                raise
            log.warning("skipping %s: %s", path, err.__cause__ or err)
            skipped.append((str(path), str(err.__cause__ or err)))
            continue
        kept.append(path)
        arrays.append(data_mod.preprocess(image, size, metadata["mean"], metadata["std"], float(metadata.get("crop", 1.0))))
    return kept, (np.stack(arrays) if arrays else np.empty((0, 3, size, size), np.float32))


def write_predictions(result: PredictResult, out: Path) -> None:
    """CSV (one row per image, a probability column per class) or JSON (rows, skipped files), by suffix."""
    if out.suffix == ".json":
        atomic_write_json(out, {"target": result.target, "backend": result.backend, "classes": result.classes,
                                "ok_class": result.ok_class, "rows": result.rows,
                                "skipped": [{"file": f, "reason": r} for f, r in result.skipped]})
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "predicted", "probability", *[f"p_{name}" for name in result.classes]])
    for row in result.rows:
        writer.writerow([row["file"], row["predicted"], f"{row['probability']:.6f}",
                         *[f"{row['probabilities'][name]:.6f}" for name in result.classes]])
    atomic_write_text(out, buffer.getvalue())


def predict(target: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, strict: bool = False) -> PredictResult:
    """Class probabilities of every image under ``inputs`` from ``target`` (artifact or run directory)."""
    from edge_tl.verify import batch_plan, run_batches

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r} must be an integer >= 1, e.g. {DEFAULT_BATCH_SIZE}")
    out = Path(out) if out is not None else None
    if out is not None and out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out} must end in .csv or .json")
    paths = collect_images(inputs)
    runner, backend, metadata, max_batch = _target(Path(target))
    size, classes = int(metadata["input_size"][0]), list(metadata["class_names"])
    result = PredictResult(str(target), backend, classes, metadata.get("ok_class"))
    with runner:
        step, exact = batch_plan(runner, metadata["input_name"], batch_size, max_batch)
        for start in range(0, len(paths), batch_size):
            kept, images = _decoded(paths[start:start + batch_size], size, metadata, strict, result.skipped)
            if not kept:
                continue
            logits = run_batches(runner, images, metadata["input_name"], metadata["output_name"], step, exact)
            probabilities = _softmax(logits)
            for path, row in zip(kept, probabilities):
                best = int(row.argmax())
                result.rows.append({"file": str(path), "predicted": classes[best], "probability": float(row[best]),
                                    "probabilities": {name: float(p) for name, p in zip(classes, row)}})
    if not result.rows:
        raise DatasetError(f"none of the {len(paths)} images could be decoded; see the warnings above")
    if out is not None:
        write_predictions(result, out)
    return result
