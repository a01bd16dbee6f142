"""edge_tl/gate.py through verify's compare: three verdicts from paired evidence, and their exit codes."""
from __future__ import annotations

import numpy as np
import pytest

from edge_tl.errors import AccuracyRegressionError, ConfigError, InconclusiveVerificationError
from edge_tl.gate import check_gate, check_gate_settings, label_free_evidence, settle_text
from edge_tl.verify import compare

CLASSES = ["crack", "ok", "scratch", "spot"]
OK = CLASSES.index("ok")


def _logits(predictions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logits whose argmax is ``predictions`` (random margins, so the logit differences are not zero)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(predictions), len(CLASSES))).astype(np.float32)
    logits[np.arange(len(predictions)), predictions] += 10.0
    return logits


def _labelled(per_class: int, float_accuracy: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, float predictions): each class right at ``float_accuracy``, wrong calls to the next class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    wrong = rng.random(len(labels)) > float_accuracy
    return labels, np.where(wrong, (labels + 1) % len(CLASSES), labels)


def test_the_same_predictions_pass_on_a_large_set_and_are_inconclusive_on_a_small_one():
    labels, predicted = _labelled(400)
    large = compare(_logits(predicted), _logits(predicted, 1), labels, CLASSES, "ok", 3.0, 2.0)
    assert large["verdict"] == "PASS" and large["passed"] and large["top1_agreement"] == 1.0
    intervals = {item["quantity"]: item for item in large["statistics"]["intervals"]}
    assert 0 < intervals["balanced_accuracy_drop"]["upper_points"] <= 3.0
    assert 0 < intervals["escape_rate_rise"]["upper_points"] <= 2.0 and large["confidence"] == 0.95
    assert large["escape_counts"]["artifact_escapes"] == large["escape_counts"]["float_escapes"] == 0
    check_gate(large)  # PASS: no exception

    labels, predicted = _labelled(12)
    small = compare(_logits(predicted), _logits(predicted, 1), labels, CLASSES, "ok", 3.0, 2.0)
    assert small["verdict"] == "INCONCLUSIVE" and not small["passed"]
    settle = small["to_settle"]
    assert settle["verdict_then"] == "PASS" and settle["factor"] > 1
    assert set(settle["additional_images_per_class"]) == set(CLASSES)
    assert all(count > 0 for count in settle["additional_images_per_class"].values())
    with pytest.raises(InconclusiveVerificationError, match="INCONCLUSIVE against the float model.*would settle it") as err:
        check_gate({**small, "artifact": "model.float.int8.onnx"})
    assert err.value.exit_code == 3


def test_an_artifact_that_passes_many_defects_as_ok_fails():
    labels, predicted = _labelled(200)
    artifact = predicted.copy()
    defects = np.flatnonzero((labels != OK) & (predicted == labels))
    artifact[defects[: len(defects) // 5]] = OK  # a fifth of the caught defects now escape
    result = compare(_logits(predicted), _logits(artifact, 1), labels, CLASSES, "ok", 3.0, 2.0)
    assert result["verdict"] == "FAIL" and result["escape_rate_delta"] > 10
    with pytest.raises(AccuracyRegressionError, match="FAIL against the float model") as err:
        check_gate({**result, "artifact": "model.float.int8.onnx"})
    assert err.value.exit_code == 1


def test_label_free_evidence_can_settle_what_the_labelled_images_cannot():
    labels, predicted = _labelled(12)
    rng = np.random.default_rng(3)
    unlabelled = rng.choice(len(CLASSES), size=4000, p=[0.15, 0.55, 0.15, 0.15])
    evidence = label_free_evidence(unlabelled, unlabelled, CLASSES, "ok", "train")
    assert evidence[1]["agreement"] == 1.0 and evidence[1]["new_ok_calls"] == 0 and "optimistic" in evidence[1]["note"]
    result = compare(_logits(predicted), _logits(predicted, 1), labels, CLASSES, "ok", 3.0, 2.0, label_free=evidence)
    assert result["verdict"] == "PASS" and result["unlabelled"]["num_images"] == 4000
    assert result["statistics"]["bonferroni"] and any("label" in route for route in result["statistics"]["routes"])
    flipped = unlabelled.copy()
    flipped[np.flatnonzero(unlabelled != OK)[:150]] = OK  # new escapes on the unlabelled images
    worse = label_free_evidence(unlabelled, flipped, CLASSES, "ok", "a folder")
    result = compare(_logits(predicted), _logits(predicted, 1), labels, CLASSES, "ok", 3.0, 2.0, label_free=worse)
    assert result["verdict"] == "INCONCLUSIVE" and result["unlabelled"]["new_ok_calls"] == 150
    # label-free counts stay as given: more labelled images like these would settle it, on labels alone
    assert result["to_settle"]["verdict_then"] == "PASS" and "would settle it" in settle_text(result)


@pytest.mark.parametrize("settings, message", [((-1.0, 2.0, 0.95), "--max-drop -1.0"),
                                               ((3.0, float("nan"), 0.95), "--max-escape-rise nan"),
                                               ((3.0, 2.0, 1.0), "--confidence 1.0")])
def test_bad_gate_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_gate_settings(*settings)
