"""The verification pack: what the device needs to verify an artifact without the float model.

A TensorRT engine has to be built and checked on the Jetson that runs it, where torch, timm and
the run directory are not. At export time the training side writes, beside the artifacts of a
stage, ``RUN_DIR/export/verify-pack.<stage>.json``:

- the float model's logits on the run's validation images (float32 values, exactly as verify
  computes them), their labels, and each image's path (``class/file``, relative to the dataset
  folder) and sha256;
- the classes, the ok class, the preprocessing (input size, mean, std, centre crop) and the gate
  settings (``max_drop``, ``max_escape_rise``, ``confidence``, ``unlabelled``);
- with ``unlabelled="train"``, the training split's paths, sha256 and float predictions (argmax),
  the label-free evidence the workstation's gate used, so the device reaches the same verdict;
- what it was made from: the sha256 of run.json and of the stage's weights, so an export reuses a
  pack that is still current and rewrites one that is not.

No image tensors: a few hundred images make a pack of tens of kB. Every artifact manifest records
the pack's sha256. :func:`verify_with_pack` is the device side of :func:`edge_tl.verify.verify`:
the pack, the images (checked against their hashes) and the artifact, no torch.
:func:`ensure_pack` (training side) computes the float logits with the stage's PyTorch model.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.data import ImageRecord
from edge_tl.errors import ArtifactError, ConfigError, DatasetError
from edge_tl.gate import (
    DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE, TRAIN_SPLIT, check_gate_settings, label_free_evidence,
)
from edge_tl.verify import (
    ARTIFACT_SUFFIXES, DEFAULT_BATCH_SIZE, artifact_metadata, artifact_runner, batch_plan, check_metadata, compare,
    float_logits, image_batches, run_batches,
)

logger = logging.getLogger(__name__)

PACK_FORMAT = "edge-tl-verify-pack"
PACK_VERSION = 1
VALIDATION_SPLIT = "validation split"


def pack_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / "export" / f"verify-pack.{stage}.json"


def stage_model_files(run_dir: str | os.PathLike, stage: str) -> list[Path]:
    """The weight files that define a stage's float model."""
    run_dir = Path(run_dir)
    if stage == "float":
        return [run_dir / "model.safetensors"]
    return [run_dir / "pruned" / "model.safetensors", run_dir / "pruned" / "shape.json"]


@dataclass(frozen=True)
class VerificationPack:
    """A stage's float reference on labelled images, with the preprocessing and the gate settings."""

    stage: str
    classes: tuple[str, ...]
    ok_class: str | None
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: float
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    labels: tuple[int, ...]
    float_logits: np.ndarray
    max_drop: float
    max_escape_rise: float
    sources: dict[str, str]  # file name -> sha256 of what the pack was made from
    confidence: float = DEFAULT_CONFIDENCE
    unlabelled: str | None = None  # "train": the training split below is label-free evidence
    unlabelled_files: tuple[str, ...] = ()
    unlabelled_sha256: tuple[str, ...] = ()
    unlabelled_float_pred: tuple[int, ...] = ()

    def gate(self) -> tuple[float, float, float, str | None]:
        return self.max_drop, self.max_escape_rise, self.confidence, self.unlabelled

    def preprocessing(self) -> dict[str, Any]:
        """The run.json-shaped facts :func:`edge_tl.verify.check_metadata` compares an artifact with."""
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "classes": list(self.classes), "ok_class": self.ok_class, "crop": self.crop}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PACK_FORMAT, "version": PACK_VERSION, "stage": self.stage, "data": VALIDATION_SPLIT,
            "classes": list(self.classes), "ok_class": self.ok_class, "input_size": [self.img_size, self.img_size],
            "mean": list(self.mean), "std": list(self.std), "crop": self.crop,
            "gate": {"max_drop": self.max_drop, "max_escape_rise": self.max_escape_rise, "confidence": self.confidence,
                     "unlabelled": self.unlabelled},
            "sources": dict(self.sources),
            "unlabelled": None if not self.unlabelled_files else {
                "source": self.unlabelled, "float_pred": list(self.unlabelled_float_pred),
                "images": [{"path": path, "sha256": digest}
                           for path, digest in zip(self.unlabelled_files, self.unlabelled_sha256)]},
            "images": [{"path": path, "sha256": digest, "label": label}
                       for path, digest, label in zip(self.files, self.sha256, self.labels)],
            # float32 values as JSON numbers: a double's repr round-trips each float32 exactly
            "float_logits": [[float(value) for value in row] for row in self.float_logits.astype(np.float32)],
        }


def _pack_error(path: Path, problem: str) -> ArtifactError:
    return ArtifactError(f"{path} is not a usable verification pack ({problem}); copy it again from the "
                         "workstation's RUN_DIR/export or re-export the artifact")


def read_pack(path: str | os.PathLike) -> VerificationPack:
    """Load and check a pack written by :func:`write_pack` (format, shapes, labels, gate)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"verification pack {path} does not exist; copy RUN_DIR/export/verify-pack.STAGE.json "
                            "from the workstation")
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != PACK_FORMAT:
        raise _pack_error(path, f"format is not {PACK_FORMAT}")
    if raw.get("version") != PACK_VERSION:
        raise _pack_error(path, f"version {raw.get('version')!r}, this edge-tl reads version {PACK_VERSION}")
    try:
        images, classes = raw["images"], tuple(raw["classes"])
        logits = np.asarray(raw["float_logits"], dtype=np.float32)
        pack = VerificationPack(
            stage=str(raw["stage"]), classes=classes, ok_class=raw.get("ok_class"),
            img_size=int(raw["input_size"][0]), mean=tuple(raw["mean"]), std=tuple(raw["std"]), crop=float(raw["crop"]),
            files=tuple(str(image["path"]) for image in images), sha256=tuple(str(image["sha256"]) for image in images),
            labels=tuple(int(image["label"]) for image in images), float_logits=logits,
            max_drop=float(raw["gate"]["max_drop"]), max_escape_rise=float(raw["gate"]["max_escape_rise"]),
            sources=dict(raw.get("sources", {})), confidence=float(raw["gate"]["confidence"]),
            unlabelled=raw["gate"].get("unlabelled"),
            unlabelled_files=tuple(str(image["path"]) for image in (raw.get("unlabelled") or {}).get("images", [])),
            unlabelled_sha256=tuple(str(image["sha256"]) for image in (raw.get("unlabelled") or {}).get("images", [])),
            unlabelled_float_pred=tuple(int(v) for v in (raw.get("unlabelled") or {}).get("float_pred", [])),
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise _pack_error(path, f"{type(err).__name__}: {err}") from err
    if not pack.files or logits.shape != (len(pack.files), len(classes)):
        raise _pack_error(path, f"float logits of shape {logits.shape} for {len(pack.files)} images, {len(classes)} classes")
    if not np.isfinite(logits).all() or any(not 0 <= label < len(classes) for label in pack.labels):
        raise _pack_error(path, "non-finite logits or a label outside the classes")
    if not all(math.isfinite(v) and v >= 0 for v in (pack.max_drop, pack.max_escape_rise)):
        raise _pack_error(path, "gate settings must be numbers of points >= 0")
    if len(pack.unlabelled_float_pred) != len(pack.unlabelled_files) or (pack.unlabelled == TRAIN_SPLIT) != bool(
            pack.unlabelled_files):
        raise _pack_error(path, "its training-split evidence does not match its gate settings")
    return pack


def write_pack(path: str | os.PathLike, pack: VerificationPack) -> str:
    """Write ``pack`` atomically; returns its sha256."""
    atomic_write_json(path, pack.to_json())
    return sha256_file(path)


def pack_records(pack: VerificationPack, data_dir: str | os.PathLike, unlabelled: bool = False) -> list[ImageRecord]:
    """The pack's validation images (or, ``unlabelled``, its training-split images) under ``data_dir``,
    each checked against its sha256 before anything runs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"--data {data_dir} is not a folder; pass the folder holding the pack's class folders")
    files, hashes = (pack.unlabelled_files, pack.unlabelled_sha256) if unlabelled else (pack.files, pack.sha256)
    labels = [0] * len(files) if unlabelled else pack.labels
    what = "training-split images (its label-free evidence)" if unlabelled else "validation images"
    missing, changed = [], []
    for rel, digest in zip(files, hashes):
        file = data_dir / rel
        if not file.is_file():
            missing.append(rel)
        elif sha256_file(file) != digest:
            changed.append(rel)
    if missing:
        raise DatasetError(f"{len(missing)} of the pack's {len(files)} {what} are not in {data_dir} (first: "
                           f"{missing[0]}); copy them with their class folders, or pass --unlabelled none")
    if changed:
        raise DatasetError(f"{len(changed)} images in {data_dir} differ from the pack (first: {changed[0]}, sha256 "
                           "mismatch); copy the pack's images unchanged, byte for byte")
    return [ImageRecord(data_dir / rel, label) for rel, label in zip(files, labels)]


def pack_sources(run_dir: str | os.PathLike, stage: str) -> dict[str, str]:
    run_dir = Path(run_dir)
    files = [run_dir / "run.json"] + stage_model_files(run_dir, stage)
    return {file.relative_to(run_dir).as_posix(): sha256_file(file) for file in files}


def ensure_pack(run_dir: str | os.PathLike, stage: str, max_drop: float = DEFAULT_MAX_DROP,
                max_escape_rise: float = DEFAULT_MAX_ESCAPE_RISE, confidence: float = DEFAULT_CONFIDENCE,
                unlabelled: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[Path, str]:
    """(path, sha256) of the stage's pack, written unless a current one (same sources and gate) exists.

    Training side: the float logits come from :func:`edge_tl.verify.float_logits`, the very
    computation the workstation's verify compares artifacts with. ``unlabelled="train"`` also stores
    the float predictions on the training split; a folder of images is workstation-only evidence
    (the pack records no label-free evidence then).
    """
    from edge_tl.finetune import run_records

    run_dir = Path(run_dir)
    path, sources = pack_path(run_dir, stage), pack_sources(run_dir, stage)
    carried = TRAIN_SPLIT if unlabelled is not None and str(unlabelled) == TRAIN_SPLIT else None
    gate = (float(max_drop), float(max_escape_rise), float(confidence), carried)
    if path.is_file():
        try:
            current = read_pack(path)
        except ArtifactError:
            current = None
        if current is not None and current.sources == sources and current.gate() == gate:
            return path, sha256_file(path)
    run_info = read_json(run_dir / "run.json")
    records = run_records(run_info, "val")
    train = run_records(run_info, "train") if carried else []
    pack = VerificationPack(
        stage=stage, classes=tuple(run_info["classes"]), ok_class=run_info.get("ok_class"),
        img_size=int(run_info["img_size"]), mean=tuple(run_info["mean"]), std=tuple(run_info["std"]),
        crop=float(run_info.get("crop", 1.0)), files=tuple(run_info["split"]["val_files"]),
        sha256=tuple(sha256_file(r.path) for r in records), labels=tuple(r.label for r in records),
        float_logits=float_logits(run_dir, stage, records, batch_size), max_drop=gate[0], max_escape_rise=gate[1],
        sources=sources, confidence=gate[2], unlabelled=carried,
        unlabelled_files=tuple(run_info["split"]["train_files"]) if carried else (),
        unlabelled_sha256=tuple(sha256_file(r.path) for r in train),
        unlabelled_float_pred=tuple(int(v) for v in float_logits(run_dir, stage, train, batch_size).argmax(1))
        if carried else (),
    )
    digest = write_pack(path, pack)
    logger.info("wrote %s: float %s logits on %d validation images%s", path, stage, len(records),
                f", predictions on {len(train)} training images" if carried else "")
    return path, digest


def device_verify_path(artifact: str | os.PathLike) -> Path:
    """Where :func:`verify_with_pack` writes its record by default: ``verify/`` beside the artifact."""
    return Path(artifact).parent / "verify" / f"{Path(artifact).name}.json"


def verify_with_pack(
    artifact: str | os.PathLike,
    pack_file: str | os.PathLike,
    data_dir: str | os.PathLike,
    max_drop: float | None = None,
    max_escape_rise: float | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    confidence: float | None = None,
    unlabelled: str | None = None,
) -> dict[str, Any]:
    """The device side of :func:`verify`: no float model, no run directory, no torch.

    The artifact runs on the pack's validation images found under ``data_dir`` (each checked
    against the sha256 the pack records), preprocessed from the artifact's own metadata, and is
    compared with the pack's float logits by the same :func:`compare`: on the same images the
    record and the verdict equal the workstation's. The gate defaults to the pack's settings.
    Writes ``out`` (default :func:`device_verify_path`) and returns the record.
    """
    artifact, pack_file = Path(artifact), Path(pack_file)
    if artifact.suffix not in ARTIFACT_SUFFIXES:
        raise ConfigError(f"artifact {artifact.name} is neither .onnx nor .engine; pass an exported ONNX file or engine")
    if not artifact.is_file():
        raise ArtifactError(f"artifact {artifact} does not exist; copy it from the workstation or build it with "
                            "`edge-tl export MODEL.onnx --format engine`")
    pack = read_pack(pack_file)
    max_drop = pack.max_drop if max_drop is None else max_drop
    max_escape_rise = pack.max_escape_rise if max_escape_rise is None else max_escape_rise
    confidence = pack.confidence if confidence is None else confidence
    check_gate_settings(max_drop, max_escape_rise, confidence)
    use_train = _pack_evidence(pack, pack_file, unlabelled)
    metadata = artifact_metadata(artifact)
    check_metadata(metadata, pack.preprocessing(), artifact, f"the pack {pack_file.name}",
                   "pass the pack of the run and stage it was exported from")
    if metadata["stage"] != pack.stage:
        raise ArtifactError(f"{artifact.name} is a {metadata['stage']} artifact but {pack_file.name} holds the "
                            f"{pack.stage} model's logits; pass verify-pack.{metadata['stage']}.json")
    records = pack_records(pack, data_dir)
    train = pack_records(pack, data_dir, unlabelled=True) if use_train else []
    runner, backend, max_batch = artifact_runner(artifact)
    with runner:
        size, exact = batch_plan(runner, metadata["input_name"], batch_size, max_batch)

        def logits_of(images: list[ImageRecord]) -> np.ndarray:
            return np.concatenate([run_batches(runner, batch, metadata["input_name"], metadata["output_name"], size,
                                               exact) for batch in image_batches(images, metadata, batch_size)])

        logits = logits_of(records)
        label_free = label_free_evidence(pack.unlabelled_float_pred, logits_of(train).argmax(1), pack.classes,
                                         pack.ok_class, TRAIN_SPLIT) if use_train else None
    result = {
        "artifact": artifact.name, "artifact_sha256": sha256_file(artifact), "backend": backend,
        "stage": pack.stage, "precision": metadata.get("precision"), "data": VALIDATION_SPLIT,
        "classes": list(pack.classes),
        **compare(pack.float_logits, logits, list(pack.labels), pack.classes, pack.ok_class, max_drop,
                  max_escape_rise, confidence, label_free),
        "float_reference": {"pack": pack_file.name, "pack_sha256": sha256_file(pack_file), "data_dir": str(data_dir)},
    }
    atomic_write_json(Path(out) if out is not None else device_verify_path(artifact), result)
    logger.info("%s vs the pack's float %s logits on %d images: agreement %.4f -> %s", artifact.name, pack.stage,
                result["num_samples"], result["top1_agreement"], "passed" if result["passed"] else "FAILED")
    return result


def _pack_evidence(pack: VerificationPack, pack_file: Path, unlabelled: str | None) -> bool:
    """Whether the device verify uses the pack's training-split evidence (``unlabelled``: None for the
    pack's setting, ``"train"`` or ``"none"``); a folder of images needs the float model."""
    if unlabelled is None:
        return pack.unlabelled == TRAIN_SPLIT
    if unlabelled == "none":
        return False
    if unlabelled != TRAIN_SPLIT:
        raise ConfigError(f"--unlabelled {unlabelled}: label-free evidence from a folder needs the float model, which "
                          "the device has not; use the pack's training split (--unlabelled train) or verify that "
                          "folder on the workstation")
    if not pack.unlabelled_files:
        raise ConfigError(f"{pack_file.name} carries no training-split evidence; re-export with the recipe's "
                          "verify.unlabelled: train, or pass --unlabelled none")
    return True
