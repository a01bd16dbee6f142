"""edge_tl/verify.py: the gate that compares an exported artifact with the float model of its stage."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from calibrate.calibration_file import CalibrationTensor, read_calibration, write_calibration
from calibrate.observe import collect_calibration
from calibrate.sources import ClassBalancedSource
from edge_tl.artifacts import read_json, sha256_file
from edge_tl.errors import (
    AccuracyRegressionError, ArtifactError, ConfigError, DatasetError, InconclusiveVerificationError,
)
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint, predict_logits, run_records
from edge_tl.fold import fold_batchnorm
from edge_tl.metrics import classification_metrics
from edge_tl.gate import check_gate
from edge_tl.verify import artifact_predictions, compare, verify
from export.onnx_metadata import set_metadata
from export.stage import ExportConfig, export_artifact
from helpers import write_slim_pruned

PX = 64
# One flipped image among the 48 generated ones moves balanced accuracy by ~2.1 points and one new
# escape moves the escape rate by ~2.8 points: PTQ of this 64 px model flips two to four images, and
# on 48 images the 95% upper bounds of the drop and of the escape rise then reach 15-25 points, so the
# INT8 gate here has margins of 40 (INT8 from absurd ranges flips 36 images and fails any margin).
INT8_GATE = {"max_drop": 40.0, "max_escape_rise": 40.0}
# On 8 validation images (two per class) even full agreement leaves 95% bounds of ~30-40 points:
# the default margins give INCONCLUSIVE, these wide ones PASS.
WIDE_GATE = {"max_drop": 60.0, "max_escape_rise": 60.0}
RESULT_KEYS = {"artifact", "stage", "num_samples", "top1_agreement", "max_abs_diff", "mean_abs_diff", "accuracy",
               "balanced_accuracy", "float_balanced_accuracy", "balanced_accuracy_delta", "escape_rate",
               "escape_rate_delta", "flips", "max_drop", "max_escape_rise", "passed"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    """A fine-tuned run good enough for a gate to mean something (0.75 balanced accuracy on validation)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("verify") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=PX, epochs=40, ok_class="ok"))
    model, run_info = load_checkpoint(out)
    source = ClassBalancedSource(run_records(run_info, "train"), 64, PX, run_info["mean"], run_info["std"],
                                 batch_size=16, min_images=1)
    calibration = collect_calibration(fold_batchnorm(model), source, model_info={"stage": "float", "img_size": PX})
    write_calibration(out / "quantized" / "float" / "calibration.json", calibration)
    export_artifact(out, ExportConfig(precision="fp32"))
    return out


def _copy_run(run_dir, tmp_path_factory, name: str):
    copy = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("verify"))
    return copy


@pytest.fixture(scope="module")
def good_int8(run_dir, tmp_path_factory):
    run = _copy_run(run_dir, tmp_path_factory, "good_int8")
    return run, export_artifact(run, ExportConfig(precision="int8"))


@pytest.fixture(scope="module")
def bad_int8(run_dir, tmp_path_factory):
    """INT8 from absurd ranges: every activation range shrunk 1000x, so nearly everything saturates."""
    run = _copy_run(run_dir, tmp_path_factory, "bad_int8")
    path = run / "quantized" / "float" / "calibration.json"
    calibration = read_calibration(path)
    shrunk = tuple(
        CalibrationTensor.activation(t.module, t.role, t.min * 1e-3, t.max * 1e-3) if t.kind == "activation" else t
        for t in calibration.tensors
    )
    write_calibration(path, dataclasses.replace(calibration, tensors=shrunk))
    return run, export_artifact(run, ExportConfig(precision="int8"))


def test_fp32_export_passes_with_full_agreement(run_dir):
    artifact = run_dir / "export" / "model.float.fp32.onnx"
    result = verify(run_dir, artifact)
    run_info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    assert RESULT_KEYS <= set(result)
    assert result["artifact"] == "model.float.fp32.onnx" and result["stage"] == "float" and result["backend"] == "onnxruntime"
    assert result["num_samples"] == len(run_info["split"]["val_files"]) == 8
    assert result["top1_agreement"] == 1.0 and result["flips"] == {}
    assert result["balanced_accuracy_delta"] == 0.0 and result["escape_rate_delta"] == 0.0
    assert result["max_abs_diff"] <= 1e-4 and result["mean_abs_diff"] <= result["max_abs_diff"]
    # the float side reproduces fine-tuning's own evaluation: same split, same preprocessing
    assert result["float_balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-12)
    assert result["balanced_accuracy"] == result["float_balanced_accuracy"] >= 0.5
    assert result["artifact_sha256"] == sha256_file(artifact)
    assert read_json(run_dir / "verify" / "model.float.fp32.onnx.json") == json.loads(json.dumps(result))
    # identical predictions, but 8 images cannot show a 5-point margin: INCONCLUSIVE, exit 3, with what would settle it
    assert result["verdict"] == "INCONCLUSIVE" and result["passed"] is False
    assert result["to_settle"]["verdict_then"] == "PASS" and result["to_settle"]["factor"] > 10
    with pytest.raises(InconclusiveVerificationError, match="would settle it") as err:
        check_gate(result)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    wide = verify(run_dir, artifact, **WIDE_GATE)
    assert wide["verdict"] == "PASS" and wide["passed"] is True
    check_gate(wide)  # passes silently


def test_artifact_predictions_run_the_artifact_and_on_request_its_float_model(run_dir):
    artifact = run_dir / "export" / "model.float.fp32.onnx"
    alone = artifact_predictions(run_dir, artifact, batch_size=3)
    both = artifact_predictions(run_dir, artifact, with_float=True)
    model, run_info = load_checkpoint(run_dir)
    val = run_records(run_info, "val")
    assert alone.float_logits is None and alone.labels == both.labels == [record.label for record in val]
    assert (alone.artifact, alone.backend, alone.stage, alone.precision, alone.data) == (
        "model.float.fp32.onnx", "onnxruntime", "float", "fp32", "validation split")
    assert alone.logits.shape == (8, 4) and np.abs(alone.logits - both.logits).max() <= 1e-5  # batching is invisible
    expected = predict_logits(model, val, PX, run_info["mean"], run_info["std"])
    assert np.abs(both.float_logits - expected).max() <= 1e-5 and np.abs(both.logits - expected).max() <= 1e-4
    metrics = read_json(run_dir / "metrics.json")
    assert alone.metrics()["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-12)
    with pytest.raises(ConfigError, match="batch size 0 must be an integer >= 1"):
        artifact_predictions(run_dir, artifact, batch_size=0)


def test_good_int8_passes(good_int8, surface_dataset):
    run, manifest = good_int8
    result = verify(run, manifest["path"], data_dir=surface_dataset, **INT8_GATE)
    assert result["num_samples"] == 48 and result["data"] == str(surface_dataset)
    assert result["precision"] == "int8" and result["top1_agreement"] >= 0.9
    assert result["balanced_accuracy_delta"] >= -INT8_GATE["max_drop"]
    assert result["escape_rate_delta"] <= INT8_GATE["max_escape_rise"]
    assert sum(result["flips"].values()) == round((1 - result["top1_agreement"]) * 48)
    assert result["verdict"] == "PASS" and result["passed"] is True
    check_gate(result)


def test_int8_from_absurd_ranges_fails_the_gate(bad_int8, surface_dataset):
    run, manifest = bad_int8
    result = verify(run, manifest["path"], data_dir=surface_dataset)
    assert result["verdict"] == "FAIL" and result["passed"] is False
    assert result["top1_agreement"] <= 0.5 and result["balanced_accuracy_delta"] < -20.0
    assert sum(result["flips"].values()) == round((1 - result["top1_agreement"]) * 48)
    assert read_json(run / "verify" / "model.float.int8.onnx.json")["verdict"] == "FAIL"
    with pytest.raises(AccuracyRegressionError, match=r"model\.float\.int8\.onnx: FAIL against the float model") as err:
        check_gate(result)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert verify(run, manifest["path"])["passed"] is False  # default gate, validation split


def test_static_batch_artifact_is_fed_one_image_at_a_time(run_dir, tmp_path_factory):
    run = _copy_run(run_dir, tmp_path_factory, "static")
    manifest = export_artifact(run, ExportConfig(precision="fp32", dynamic_batch=False))
    assert manifest["dynamic_batch"] is False
    result = verify(run, manifest["path"], batch_size=3)
    assert result["num_samples"] == 8 and result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4


def test_pruned_stage_is_verified_against_the_pruned_model(run_dir, tmp_path_factory):
    run = _copy_run(run_dir, tmp_path_factory, "pruned")
    pruned = write_slim_pruned(run)
    model, run_info = load_checkpoint(run)
    val = run_records(run_info, "val")
    pruned_logits = predict_logits(pruned, val, PX, run_info["mean"], run_info["std"])
    float_logits = predict_logits(model, val, PX, run_info["mean"], run_info["std"])
    assert np.abs(pruned_logits - float_logits).max() > 0.05  # a float reference would show up below

    fp32 = export_artifact(run, ExportConfig(stage="pruned"))
    assert fp32["path"] == str(run / "export" / "model.pruned.fp32.onnx") and fp32["max_abs_diff"] <= 1e-4
    result = verify(run, fp32["path"], **WIDE_GATE)
    assert result["stage"] == "pruned" and result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4
    labels = [record.label for record in val]
    expected = classification_metrics(labels, pruned_logits.argmax(1), run_info["classes"])["balanced_accuracy"]
    assert result["float_balanced_accuracy"] == pytest.approx(expected, abs=1e-12) and result["passed"] is True

    source = ClassBalancedSource(run_records(run_info, "train"), 64, PX, run_info["mean"], run_info["std"],
                                 batch_size=16, min_images=1)
    calibration = collect_calibration(fold_batchnorm(pruned), source, model_info={"stage": "pruned", "img_size": PX})
    write_calibration(run / "quantized" / "pruned" / "calibration.json", calibration)
    int8 = export_artifact(run, ExportConfig(stage="pruned", precision="int8"))
    assert int8["path"] == str(run / "export" / "model.pruned.int8.onnx") and int8["calibration"]["path"] == (
        "quantized/pruned/calibration.json")
    result = verify(run, int8["path"])
    assert result["stage"] == "pruned" and result["precision"] == "int8" and result["top1_agreement"] >= 0.75


def _with_metadata(source, target, **changes):
    model = onnx.load(str(source))
    props = {prop.key: prop.value for prop in model.metadata_props}
    props.update({key: json.dumps(value) for key, value in changes.items()})
    set_metadata(model, props)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def test_artifact_from_another_run_is_rejected(run_dir, tmp_path):
    source = run_dir / "export" / "model.float.fp32.onnx"
    other_mean = _with_metadata(source, tmp_path / "a" / "model.float.fp32.onnx", mean=[0.485, 0.456, 0.406])
    with pytest.raises(ArtifactError, match=r"declares mean \[0\.485, 0\.456, 0\.406\] but the run has \[0\.5, 0\.5, 0\.5\]"):
        verify(run_dir, other_mean)
    other_classes = _with_metadata(source, tmp_path / "b" / "model.float.fp32.onnx", class_names=["bad", "good"])
    with pytest.raises(ArtifactError, match="declares classes"):
        verify(run_dir, other_classes)
    other_size = _with_metadata(source, tmp_path / "c" / "model.float.fp32.onnx", input_size=[96, 96])
    with pytest.raises(ArtifactError, match="declares input size"):
        verify(run_dir, other_size)
    no_stage = _with_metadata(source, tmp_path / "d" / "model.float.fp32.onnx", stage="distilled")
    with pytest.raises(ArtifactError, match="names stage 'distilled'"):
        verify(run_dir, no_stage)


def test_data_folder_with_other_classes_is_a_dataset_error(run_dir, surface_dataset, tmp_path):
    for name in ("good", "bad"):
        (tmp_path / "other" / name).mkdir(parents=True)
        for image in sorted((surface_dataset / "ok").iterdir())[:2]:
            shutil.copy(image, tmp_path / "other" / name / image.name)
    with pytest.raises(DatasetError, match="has classes bad, good but the run has crack, ok, scratch, spot"):
        verify(run_dir, run_dir / "export" / "model.float.fp32.onnx", data_dir=tmp_path / "other")


def test_bad_arguments(run_dir, tmp_path):
    artifact = run_dir / "export" / "model.float.fp32.onnx"
    with pytest.raises(ConfigError, match="--max-drop -1.0 must be a number of percentage points >= 0"):
        verify(run_dir, artifact, max_drop=-1.0)
    with pytest.raises(ConfigError, match="--max-escape-rise nan"):
        verify(run_dir, artifact, max_escape_rise=float("nan"))
    with pytest.raises(ConfigError, match="neither .onnx nor .engine"):
        verify(run_dir, run_dir / "model.safetensors")
    with pytest.raises(ArtifactError, match="does not exist; create it with `edge-tl export"):
        verify(run_dir, run_dir / "export" / "model.pruned.int8.onnx")
    with pytest.raises(ArtifactError, match="run.json is missing"):
        verify(tmp_path, artifact)


def test_compare_hand_computed():
    classes = ["crack", "ok", "scratch"]
    labels = [0, 0, 1, 1, 2, 2]
    eye = np.eye(3, dtype=np.float32) * 2.0
    float_logits, artifact_logits = eye[[0, 0, 1, 1, 2, 1]], eye[[0, 1, 1, 1, 1, 1]]
    result = compare(float_logits, artifact_logits, labels, classes, "ok", max_drop=1.0, max_escape_rise=0.0)
    assert result["top1_agreement"] == pytest.approx(4 / 6)
    assert result["max_abs_diff"] == 2.0 and result["mean_abs_diff"] == pytest.approx(8 / 18)
    assert result["float_balanced_accuracy"] == pytest.approx(2.5 / 3) and result["balanced_accuracy"] == pytest.approx(0.5)
    assert result["balanced_accuracy_delta"] == pytest.approx(-100 / 3)
    assert result["float_escape_rate"] == 0.25 and result["escape_rate"] == 0.75 and result["escape_rate_delta"] == 50.0
    assert result["flips"] == {"crack->ok": 1, "scratch->ok": 1}
    # the paired counts behind the verdict: per class (float right / artifact right) and on the defects
    assert result["paired_counts"]["crack"] == {"both_right": 1, "float_only": 1, "artifact_only": 0, "both_wrong": 0}
    assert result["paired_counts"]["scratch"] == {"both_right": 0, "float_only": 1, "artifact_only": 0, "both_wrong": 1}
    assert result["escape_counts"] == {"both_catch": 1, "artifact_escapes": 2, "float_escapes": 0, "both_escape": 1}
    # a 33-point drop on 6 images: too few to show it is beyond a 1-point margin at 95%, and far from a PASS
    assert result["verdict"] == "INCONCLUSIVE" and result["passed"] is False
    assert compare(float_logits, artifact_logits, labels, classes, "ok", 100.0, 100.0)["verdict"] == "PASS"
    no_ok_class = compare(float_logits, artifact_logits, labels, classes, None, max_drop=100.0, max_escape_rise=0.0)
    assert no_ok_class["verdict"] == "PASS" and "escape_rate_delta" not in no_ok_class
    assert "escape_counts" not in no_ok_class
