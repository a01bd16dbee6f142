"""The verification pack's file format: what it holds, how it is read, checked and written.

``RUN_DIR/export/verify-pack.<stage>.json`` (see :mod:`edge_tl.verify_pack` for what writes and uses
it). This module needs numpy only and imports neither the verify gate nor torch, so both the
workstation's verify (which reuses a current pack's float predictions) and the device read it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.data import ImageRecord
from edge_tl.errors import ArtifactError, DatasetError
from edge_tl.gate import DEFAULT_CONFIDENCE, TRAIN_SPLIT

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
