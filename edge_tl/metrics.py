"""Classification metrics for defect detection: balanced accuracy, per-class recall, escape rate.

All accuracies and rates are fractions in [0, 1]. ``*_delta`` values elsewhere are in points.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_tl.errors import ConfigError


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def balanced_accuracy(matrix: np.ndarray) -> float:
    """Mean recall over the classes that have support."""
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    recall = np.diag(matrix)[present] / support[present]
    return float(recall.mean())


def escape_and_false_reject(matrix: np.ndarray, ok_index: int) -> tuple[float, float]:
    """(share of defective parts predicted ok, share of good parts predicted defective)."""
    defect_rows = np.ones(matrix.shape[0], dtype=bool)
    defect_rows[ok_index] = False
    defects = matrix[defect_rows].sum()
    escapes = matrix[defect_rows, ok_index].sum()
    good = matrix[ok_index].sum()
    rejects = good - matrix[ok_index, ok_index]
    escape_rate = float(escapes / defects) if defects else 0.0
    false_reject_rate = float(rejects / good) if good else 0.0
    return escape_rate, false_reject_rate


def resolve_ok_class(classes: Sequence[str], ok_class: str | None) -> int | None:
    """Index of the good-part class, or None; an unknown name is a configuration error."""
    if ok_class is None:
        return None
    if ok_class not in classes:
        raise ConfigError(f"--ok-class {ok_class!r} names no class; the classes are {', '.join(classes)}")
    return list(classes).index(ok_class)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], ok_class: str | None = None
) -> dict:
    """The metrics.json dictionary every stage writes."""
    classes = list(classes)
    ok_index = resolve_ok_class(classes, ok_class)
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    total = int(matrix.sum())
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    per_class = {}
    for index, name in enumerate(classes):
        hits = int(matrix[index, index])
        per_class[name] = {
            "precision": float(hits / predicted[index]) if predicted[index] else 0.0,
            "recall": float(hits / support[index]) if support[index] else 0.0,
            "support": int(support[index]),
        }
    result = {
        "classes": classes,
        "num_samples": total,
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "balanced_accuracy": balanced_accuracy(matrix),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
    if ok_index is not None:
        result["ok_class"] = classes[ok_index]
        result["escape_rate"], result["false_reject_rate"] = escape_and_false_reject(matrix, ok_index)
    return result
