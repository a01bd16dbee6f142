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
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.data import ImageRecord
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.gate import (
    DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE, TRAIN_SPLIT, check_gate_settings, label_free_evidence,
)
from edge_tl.verify import (
    ARTIFACT_SUFFIXES, DEFAULT_BATCH_SIZE, artifact_metadata, artifact_runner, batch_plan, check_metadata, compare,
    float_logits, image_batches, run_batches,
)

from edge_tl.pack_format import (
    VALIDATION_SPLIT, VerificationPack, pack_path, pack_records, pack_sources, read_pack, write_pack,
)

logger = logging.getLogger(__name__)


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
