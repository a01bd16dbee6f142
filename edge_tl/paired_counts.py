"""Paired correctness counts of the float model and an artifact on the same images (see paired_stats).

A :class:`PairedTable` per class (or for the defect images); :class:`LabelFreeCounts` for unlabelled
images, the float model's calls taken as reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_tl.errors import ConfigError

CELLS = ("both_right", "float_only", "artifact_only", "both_wrong")


@dataclass(frozen=True)
class PairedTable:
    """Paired correctness counts of the float model and the artifact on the same images."""

    both_right: int
    float_only: int  # float right, artifact wrong
    artifact_only: int  # artifact right, float wrong
    both_wrong: int

    def __post_init__(self) -> None:
        if min(self.counts()) < 0:
            raise ConfigError(f"paired table counts must be >= 0, got {self}")

    def counts(self) -> tuple[int, int, int, int]:
        return (self.both_right, self.float_only, self.artifact_only, self.both_wrong)

    @property
    def n(self) -> int:
        return sum(self.counts())

    @property
    def delta(self) -> float:
        """Artifact minus float accuracy on these images, a fraction."""
        return (self.artifact_only - self.float_only) / self.n

    def scaled(self, factor: float) -> PairedTable:
        """Every count times ``factor``, rounded half to even (the same rounding as images_to_settle)."""
        return PairedTable(*(int(v) for v in np.rint(np.asarray(self.counts(), dtype=float) * factor)))


def _label_arrays(*arrays: Sequence[int]) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    if len({a.size for a in out}) != 1:
        raise ConfigError(f"labels and predictions must have one length each, got {[a.size for a in out]}")
    return out


def _cell_counts(groups: np.ndarray, float_right: np.ndarray, artifact_right: np.ndarray, size: int) -> np.ndarray:
    cells = 2 * (~float_right) + (~artifact_right)  # 0 both right, 1 float only, 2 artifact only, 3 both wrong
    counts = np.zeros((size, 4), dtype=np.int64)
    np.add.at(counts, (groups, cells.astype(np.int64)), 1)
    return counts


def paired_tables(labels: Sequence[int], float_pred: Sequence[int], artifact_pred: Sequence[int],
                  num_classes: int) -> list[PairedTable]:
    """One table per true class: each model's correctness on that class's images (its recall)."""
    truth, float_calls, artifact_calls = _label_arrays(labels, float_pred, artifact_pred)
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
        raise ConfigError(f"labels must lie in 0..{num_classes - 1}, got {truth.min()}..{truth.max()}")
    counts = _cell_counts(truth, float_calls == truth, artifact_calls == truth, num_classes)
    return [PairedTable(*(int(v) for v in row)) for row in counts]


def escape_table(labels: Sequence[int], float_pred: Sequence[int], artifact_pred: Sequence[int],
                 ok_index: int) -> PairedTable:
    """The defect images (label != ok_index), "right" meaning caught (predicted anything but ok).

    ``float_only`` counts new escapes (the float model catches the defect, the artifact calls it ok),
    so the table's ``delta`` is minus the escape-rate change; :func:`escape_rate_delta` has the sign
    of a rise.
    """
    truth, float_calls, artifact_calls = _label_arrays(labels, float_pred, artifact_pred)
    defects = truth != ok_index
    counts = _cell_counts(np.zeros(int(defects.sum()), dtype=np.int64), float_calls[defects] != ok_index,
                          artifact_calls[defects] != ok_index, 1)
    return PairedTable(*(int(v) for v in counts[0]))


def escape_rate_delta(table: PairedTable) -> float:
    """Artifact minus float escape rate on an :func:`escape_table`, a fraction (> 0 is a rise)."""
    return -table.delta


@dataclass(frozen=True)
class LabelFreeCounts:
    """What unlabelled images give, the float model's calls taken as reference (by float-predicted class)."""

    per_class_flips: tuple[int, ...]  # images of that float call the artifact predicts otherwise
    per_class_counts: tuple[int, ...]  # images the float model predicts as that class
    new_ok_calls: int | None = None  # float calls a defect, artifact calls ok (None without an ok class)
    float_defect_calls: int | None = None

    @property
    def agreement(self) -> tuple[int, int]:
        total = sum(self.per_class_counts)
        return total - sum(self.per_class_flips), total


def label_free_counts(float_pred: Sequence[int], artifact_pred: Sequence[int], num_classes: int,
                      ok_index: int | None = None) -> LabelFreeCounts:
    float_calls, artifact_calls = _label_arrays(float_pred, artifact_pred)
    counts = np.bincount(float_calls, minlength=num_classes)
    flips = np.bincount(float_calls[artifact_calls != float_calls], minlength=num_classes)
    if ok_index is None:
        return LabelFreeCounts(tuple(map(int, flips)), tuple(map(int, counts)))
    defect_calls = float_calls != ok_index
    return LabelFreeCounts(tuple(map(int, flips)), tuple(map(int, counts)),
                           int((defect_calls & (artifact_calls == ok_index)).sum()), int(defect_calls.sum()))
