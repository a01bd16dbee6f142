"""Classification metrics against a confusion matrix worked out by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_tl.errors import ConfigError
from edge_tl.metrics import balanced_accuracy, classification_metrics, confusion_matrix

CLASSES = ["ok", "scratch", "crack"]
# Rows = true class.        ok: 4 right, 1 -> scratch   scratch: 2 right, 1 -> ok   crack: 1 right, 1 -> ok
Y_TRUE = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 0, 1, 1, 1, 0, 2, 0]


def test_confusion_matrix_rows_are_true_classes():
    np.testing.assert_array_equal(confusion_matrix(Y_TRUE, Y_PRED, 3), [[4, 1, 0], [1, 2, 0], [1, 0, 1]])


def test_hand_computed_metrics_with_ok_class():
    metrics = classification_metrics(Y_TRUE, Y_PRED, CLASSES, ok_class="ok")
    assert metrics["classes"] == CLASSES
    assert metrics["num_samples"] == 10
    assert metrics["confusion_matrix"] == [[4, 1, 0], [1, 2, 0], [1, 0, 1]]
    assert metrics["accuracy"] == 0.7
    # recalls 4/5, 2/3, 1/2 -> (24 + 20 + 15) / 30 / 3
    assert metrics["balanced_accuracy"] == pytest.approx(59 / 90, abs=1e-12)
    assert metrics["per_class"] == {
        "ok": {"precision": 4 / 6, "recall": 4 / 5, "support": 5},
        "scratch": {"precision": 2 / 3, "recall": 2 / 3, "support": 3},
        "crack": {"precision": 1.0, "recall": 1 / 2, "support": 2},
    }
    assert metrics["ok_class"] == "ok"
    assert metrics["escape_rate"] == 2 / 5  # defects predicted ok: 1 scratch + 1 crack of 5 defects
    assert metrics["false_reject_rate"] == 1 / 5  # good parts predicted defective: 1 of 5
    assert json.loads(json.dumps(metrics)) == metrics


def test_ok_class_at_another_index():
    # Same predictions with the good class last: escapes are predictions of index 2.
    classes = ["crack", "scratch", "ok"]
    remap = np.array([2, 1, 0])
    metrics = classification_metrics(remap[Y_TRUE], remap[Y_PRED], classes, ok_class="ok")
    assert metrics["escape_rate"] == 2 / 5
    assert metrics["false_reject_rate"] == 1 / 5
    assert metrics["per_class"]["ok"]["recall"] == 4 / 5


def test_without_ok_class_there_are_no_rates():
    metrics = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert "escape_rate" not in metrics and "false_reject_rate" not in metrics and "ok_class" not in metrics


def test_classes_without_support_are_left_out_of_balanced_accuracy():
    # Class 2 never occurs and is never predicted: recall over classes 0 and 1 only.
    metrics = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], CLASSES, ok_class="ok")
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2, abs=1e-12)
    assert metrics["per_class"]["crack"] == {"precision": 0.0, "recall": 0.0, "support": 0}
    assert metrics["escape_rate"] == 0.0
    assert metrics["false_reject_rate"] == 1 / 3
    assert balanced_accuracy(np.zeros((3, 3), dtype=np.int64)) == 0.0


def test_perfect_predictions():
    metrics = classification_metrics(Y_TRUE, Y_TRUE, CLASSES, ok_class="ok")
    assert metrics["accuracy"] == metrics["balanced_accuracy"] == 1.0
    assert metrics["escape_rate"] == metrics["false_reject_rate"] == 0.0


def test_unknown_ok_class_is_a_config_error_naming_the_classes():
    with pytest.raises(ConfigError) as info:
        classification_metrics(Y_TRUE, Y_PRED, CLASSES, ok_class="free")
    message = str(info.value)
    assert "'free'" in message and "ok, scratch, crack" in message
    assert "\n" not in message
