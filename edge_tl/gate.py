"""The release gate of a verification: PASS, FAIL or INCONCLUSIVE, from paired evidence.

The float model and the artifact see the same images, so the comparison is paired
(:mod:`edge_tl.paired_stats`): per class, the images the float model gets right and the artifact
wrong and the reverse; on defects, the ones the float model catches and the artifact passes as ok
and the reverse. A point estimate on a few dozen defects can show neither that an artifact is as
good as the float model nor that it is worse, so the gate says which the data show:

- PASS: the upper confidence bounds of the balanced-accuracy drop and of the escape-rate rise are
  within ``max_drop`` and ``max_escape_rise`` (points);
- FAIL: a lower bound is beyond its margin, or (at a zero escape margin) the exact McNemar test
  finds a significant loss on defects;
- INCONCLUSIVE: neither; the record says how many more labelled images, per class, images like
  these would need to settle it (:func:`edge_tl.paired_stats.images_to_settle`).

Images without labels add label-free evidence (the float model's calls taken as the reference):
agreement, the rate at which the artifact calls ok what the float model calls a defect (new
escapes) and the drop their disagreement implies. It can provide the PASS bounds instead of the
labelled ones, Bonferroni-corrected. The run's own training split may serve (``unlabelled="train"``):
the model was fitted and calibrated on those images, so their agreement can read optimistic; the
record marks it.

``gate_record`` is pure (used by the workstation's verify and the device's ``verify --pack`` alike);
``check_gate`` turns a record into the exit code a release pipeline keys on: 0 PASS, 1 FAIL
(:class:`~edge_tl.errors.AccuracyRegressionError`), 3 INCONCLUSIVE
(:class:`~edge_tl.errors.InconclusiveVerificationError`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from edge_tl.errors import AccuracyRegressionError, ConfigError, InconclusiveVerificationError

DEFAULT_MAX_DROP = 5.0
DEFAULT_MAX_ESCAPE_RISE = 2.0
DEFAULT_CONFIDENCE = 0.95
TRAIN_SPLIT = "train"
TRAIN_SPLIT_NOTE = ("the run's training split: the model was fitted and calibrated on these images, so agreement "
                    "there can read optimistic")


def check_gate_settings(max_drop: float, max_escape_rise: float, confidence: float = DEFAULT_CONFIDENCE) -> None:
    """One-line errors for margins that are not points >= 0 or a confidence outside (0.5, 1)."""
    for label, value in (("--max-drop", max_drop), ("--max-escape-rise", max_escape_rise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{label} {value!r} must be a number of percentage points >= 0, e.g. 2.0")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 < confidence < 1:
        raise ConfigError(f"--confidence {confidence!r} must be a fraction between 0.5 and 1, e.g. 0.95")


def label_free_evidence(float_pred: Sequence[int], artifact_pred: Sequence[int], classes: Sequence[str],
                        ok_class: str | None, source: str):
    """(LabelFreeCounts for the gate, the record's summary) from predictions on images without labels."""
    from edge_tl.paired_counts import label_free_counts

    counts = label_free_counts(float_pred, artifact_pred, len(classes),
                               list(classes).index(ok_class) if ok_class is not None else None)
    agree, total = counts.agreement
    summary: dict[str, Any] = {
        "source": source, "num_images": int(total), "agreement": agree / total if total else 0.0,
        "flips_by_float_class": dict(zip(classes, counts.per_class_flips)),
        "float_calls_by_class": dict(zip(classes, counts.per_class_counts)),
    }
    if counts.new_ok_calls is not None:
        summary.update({"new_ok_calls": counts.new_ok_calls, "float_defect_calls": counts.float_defect_calls})
    if source == TRAIN_SPLIT:
        summary["note"] = TRAIN_SPLIT_NOTE
    return counts, summary


def gate_record(labels: Sequence[int], float_pred: Sequence[int], artifact_pred: Sequence[int],
                classes: Sequence[str], ok_class: str | None, max_drop: float, max_escape_rise: float,
                confidence: float = DEFAULT_CONFIDENCE, label_free=None) -> dict[str, Any]:
    """The verdict, the paired statistics behind it and, when INCONCLUSIVE, what would settle it."""
    from edge_tl.paired_counts import escape_table, paired_tables
    from edge_tl.paired_stats import Verdict, decide, images_to_settle

    check_gate_settings(max_drop, max_escape_rise, confidence)
    classes = list(classes)
    tables = paired_tables(labels, float_pred, artifact_pred, len(classes))
    escape = escape_table(labels, float_pred, artifact_pred, classes.index(ok_class)) if ok_class is not None else None
    alpha = 1.0 - float(confidence)
    decision = decide(tables, escape, float(max_drop), float(max_escape_rise), alpha, label_free)
    record: dict[str, Any] = {
        "verdict": decision.verdict.value, "passed": decision.verdict is Verdict.PASS, "confidence": float(confidence),
        "paired_counts": {name: dict(zip(("both_right", "float_only", "artifact_only", "both_wrong"), table.counts()))
                          for name, table in zip(classes, tables)},
        "statistics": decision.to_dict(),
    }
    if escape is not None:
        record["escape_counts"] = dict(zip(("both_catch", "artifact_escapes", "float_escapes", "both_escape"),
                                           escape.counts()))
    if decision.verdict is Verdict.INCONCLUSIVE:
        settle = images_to_settle(tables, escape, float(max_drop), float(max_escape_rise), alpha, label_free)
        record["to_settle"] = None if settle.factor is None else {
            "verdict_then": settle.verdict.value if settle.verdict else None, "factor": settle.factor,
            "additional_images_per_class": dict(zip(classes, settle.additional_images_per_class or ())),
            "additional_defect_images": settle.additional_defect_images,
        }
    return record


def bounds_text(record: dict[str, Any]) -> str:
    """'drop <= 4.1 pt, escape rise <= 2.6 pt (95%)': the upper bounds the verdict was judged on."""
    intervals = {item["quantity"]: item for item in record.get("statistics", {}).get("intervals", [])}
    parts = []
    for key, label in (("balanced_accuracy_drop", "drop"), ("escape_rate_rise", "escape rise"),
                       ("label_free_drop", "label-free drop"), ("label_free_new_escape", "label-free new escapes")):
        if key in intervals:
            parts.append(f"{label} <= {intervals[key]['upper_points']:.2f} pt")
    return ", ".join(parts) + f" ({100 * record.get('confidence', DEFAULT_CONFIDENCE):g}%)" if parts else ""


def settle_text(record: dict[str, Any]) -> str:
    """What would settle an INCONCLUSIVE record, in words."""
    settle = record.get("to_settle")
    if not settle:
        return "more images like these would not settle it (the observed difference sits at the margin)"
    per_class = ", ".join(f"{name} +{count}" for name, count in settle["additional_images_per_class"].items() if count)
    defects = settle.get("additional_defect_images")
    return (f"about {math.ceil(settle['factor'] * 10) / 10:g}x the labelled images would settle it ({per_class}"
            + (f"; {defects} more defect images" if defects else "") + f"), expected verdict {settle['verdict_then']}")


def check_gate(result: dict[str, Any]) -> None:
    """Raise (exit 1 FAIL, exit 3 INCONCLUSIVE) with one line unless ``result`` passed the gate."""
    verdict = result.get("verdict", "PASS" if result["passed"] else "FAIL")
    if verdict == "PASS":
        return
    head = (f"{result['artifact']}: {verdict} against the float model (balanced accuracy "
            f"{result['balanced_accuracy_delta']:+.2f} points" + (
                f", escape rate {result['escape_rate_delta']:+.2f} points" if "escape_rate_delta" in result else "")
            + f", top-1 agreement {result['top1_agreement']:.4f}; margins {result['max_drop']:g} / "
            f"{result['max_escape_rise']:g} points; {bounds_text(result)})")
    if verdict == "INCONCLUSIVE":
        raise InconclusiveVerificationError(f"{head}: {settle_text(result)}, or add images without labels "
                                            "(--unlabelled DIR)")
    reasons = "; ".join(result.get("statistics", {}).get("reasons", [])[:2])
    raise AccuracyRegressionError(f"{head}: {reasons or 'worse than the float model'}; recalibrate or quantize "
                                  "with QAT, or keep the float model")
