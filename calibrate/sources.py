"""Calibration sources: the one interface every calibrator consumes.

The shape is ONNX Runtime's ``CalibrationDataReader``: ``get_next()`` returns the next feed
``{input_name: float32 NCHW array}`` or None when the data is exhausted, and ``rewind()`` starts
over. NNI calibration, ONNX Runtime and the TensorRT calibrator all read the same source, so the
preprocessing lives here and never in a calibrator.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from edge_tl.artifacts import sha256_text
from edge_tl.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_INPUT_NAME = "input"
MIN_CALIBRATION_IMAGES = 64


@runtime_checkable
class CalibrationSource(Protocol):
    input_name: str

    def get_next(self) -> dict[str, np.ndarray] | None: ...

    def rewind(self) -> None: ...


def _path_and_label(record: Any) -> tuple[Path, Any]:
    if hasattr(record, "path") and hasattr(record, "label"):
        return Path(record.path), record.label
    try:
        path, label = record
    except (TypeError, ValueError):
        raise ConfigError(
            f"calibration record {record!r} is neither an ImageRecord nor a (path, label) pair"
        ) from None
    return Path(path), label


def class_balanced_order(labelled: Sequence[tuple[Path, Any]], num_images: int, seed: int) -> list[tuple[Path, Any]]:
    """Pick ``num_images`` items round-robin over classes (sorted), each class in a seeded shuffle.

    Every class contributes before any class contributes twice, so a rare defect class is always
    present; a class that runs out simply stops contributing. Depends only on the records and seed.
    """
    by_label: dict[Any, list[tuple[Path, Any]]] = {}
    for item in sorted(labelled, key=lambda pair: (str(pair[1]), pair[0].as_posix())):
        by_label.setdefault(item[1], []).append(item)
    rng = np.random.default_rng(seed)
    queues = []
    for label in sorted(by_label, key=str):
        members = by_label[label]
        queues.append([members[i] for i in rng.permutation(len(members))])
    chosen: list[tuple[Path, Any]] = []
    depth = 0
    while len(chosen) < num_images and any(depth < len(queue) for queue in queues):
        for queue in queues:
            if depth < len(queue) and len(chosen) < num_images:
                chosen.append(queue[depth])
        depth += 1
    return chosen


class ArraySource:
    """A calibration source over an in-memory float32 NCHW array (tests, precomputed inputs)."""

    def __init__(self, images: np.ndarray, batch_size: int = 8, input_name: str = DEFAULT_INPUT_NAME) -> None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ConfigError(f"calibration images must be a non-empty NCHW array, got shape {images.shape}")
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        self.images, self.batch_size, self.input_name = images, batch_size, input_name
        self._next = 0

    def __len__(self) -> int:
        return len(self.images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next:self._next + self.batch_size]
        self._next += len(batch)
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._next = 0


class ClassBalancedSource:
    """Deterministic, class-balanced calibration images from the records it is given.

    Give it the training split only: calibrating on validation images would leak them into the
    quantized model that is then evaluated on them. Images are decoded and preprocessed with the
    inference transform (``edge_tl.data.load_image`` and ``preprocess``) when a batch is asked for.
    """

    def __init__(
        self,
        train_records: Sequence[Any],
        num_images: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 8,
        seed: int = 0,
        input_name: str = DEFAULT_INPUT_NAME,
        min_images: int = MIN_CALIBRATION_IMAGES,
        crop: float = 1.0,
    ) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ConfigError(f"number of calibration images {num_images!r} must be an integer >= 1, e.g. 256")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"calibration batch size {batch_size!r} must be an integer >= 1, e.g. 8")
        labelled = [_path_and_label(record) for record in train_records]
        if not labelled:
            raise DatasetError("no training images to calibrate with; the training split is empty")
        self.items = class_balanced_order(labelled, num_images, seed)
        self.img_size, self.mean, self.std, self.crop = img_size, tuple(mean), tuple(std), crop
        self.batch_size, self.seed, self.input_name = batch_size, seed, input_name
        self._next = 0
        counts: dict[str, int] = {}
        for _, label in self.items:
            counts[str(label)] = counts.get(str(label), 0) + 1
        self.class_counts = counts
        if len(self.items) < min_images:
            logger.warning(
                "only %d calibration images (asked for %d, %d available); fewer than %d gives noisy "
                "INT8 ranges: add training images or raise --calib-images",
                len(self.items), num_images, len(labelled), min_images,
            )
        logger.info("calibration source: %d images, per class %s", len(self.items), counts)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.items]

    def file_list_hash(self, root: str | os.PathLike | None = None) -> str:
        """sha256 over ``label/path`` lines of the chosen files, in the order they are fed.

        With ``root`` the paths are taken relative to it, so the hash does not depend on where
        the dataset folder is mounted.
        """
        def shown(path: Path) -> str:
            if root is None:
                return path.as_posix()
            try:
                return path.resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                return path.as_posix()

        return sha256_text([f"{label}/{shown(path)}" for path, label in self.items])

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """One image through the inference transform: float32 (3, img_size, img_size)."""
        from edge_tl.data import load_image, preprocess

        return preprocess(load_image(path), self.img_size, self.mean, self.std, self.crop)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.items):
            return None
        chunk = self.items[self._next:self._next + self.batch_size]
        self._next += len(chunk)
        batch = np.stack([self.load(path) for path, _ in chunk]).astype(np.float32, copy=False)
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0


def iter_batches(source: CalibrationSource):
    """Rewind ``source`` and yield its input arrays until it is exhausted."""
    source.rewind()
    while (feed := source.get_next()) is not None:
        yield feed[source.input_name]
