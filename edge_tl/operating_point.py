"""The escape-budget operating point: pure math on logits, below fine-tuning and cross-validation.

The shift subtracted from the ok class's logit so that at most a given share of defective parts
would be passed as good (:func:`ok_logit_shift`), measured on out-of-fold logits; folded into the
head's bias (:func:`apply_ok_shift`) it travels with every exported artifact.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edge_tl.metrics import classification_metrics, resolve_ok_class

SHIFT_CLEARANCE = 1e-4  # logit units added to the chosen margin; far above float32 round-off of the bias
ESCAPE_BUDGETS = (0.0, 0.01, 0.02, 0.05)


def ok_logit_shift(logits: np.ndarray, labels: np.ndarray, ok_index: int, max_escape: float) -> float:
    """The smallest shift s >= 0 such that, with the ok logit lowered by s, at most ``max_escape`` of the
    defective samples are still predicted ok (the margin of the first sample to stop is cleared by SHIFT_CLEARANCE)."""
    defective = np.asarray(labels) != ok_index
    if not defective.any():
        return 0.0
    others = np.delete(logits[defective], ok_index, axis=1).max(1)
    margins = np.sort(logits[defective, ok_index] - others)[::-1]  # > 0: passed as good
    allowed = math.floor(max_escape * len(margins) + 1e-9)
    if allowed >= len(margins):
        return 0.0
    # just past the margin: the sample on it is then decided for the defect (ties would go to argmax's order)
    return float(max(0.0, margins[allowed] + SHIFT_CLEARANCE))


def operating_point(logits: np.ndarray, labels: np.ndarray, classes, ok_class: str, max_escape: float) -> dict:
    """The ok-logit shift for an escape budget and what it costs, measured on the same (out-of-fold) logits."""
    ok_index = resolve_ok_class(classes, ok_class)
    shift = ok_logit_shift(logits, labels, ok_index, max_escape)
    shifted = logits.copy()
    shifted[:, ok_index] -= shift
    metrics = classification_metrics(labels, shifted.argmax(1), classes, ok_class)
    return {"max_escape": max_escape, "ok_logit_shift": shift,
            **{key: metrics[key] for key in ("balanced_accuracy", "escape_rate", "false_reject_rate")}}


def apply_ok_shift(head: nn.Linear, ok_index: int, shift: float) -> None:
    """Lower the ok class's bias by ``shift``: the operating point becomes part of the deployed weights."""
    with torch.no_grad():
        head.bias[ok_index] -= shift
