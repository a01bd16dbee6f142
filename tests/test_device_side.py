"""The device side: verification packs, verify --pack, and the light install without torch, timm or NNI.

A run is fine-tuned and exported here (the training side); the device side then verifies, benches
and predicts in a subprocess where torch, torchvision, timm, NNI and safetensors cannot be
imported, on a copy of the validation images only, as on a Jetson. Its records must equal the
workstation verify's. TensorRT is not installed here: engine builds are checked up to the point
where TensorRT is needed (the message then), never called tested.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_tl.artifacts import read_json, sha256_file
from edge_tl.cli import main
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError, DatasetError
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint, predict_logits, run_records
from edge_tl.install_profile import importable
from edge_tl.verify import verify
from edge_tl.verify_pack import pack_path, read_pack, verify_with_pack
from export.engine_from_onnx import EngineConfig, build_engine_from_onnx
from export.stage import ExportConfig, export_artifact
from helpers import write_ptq_calibration

PX = 64
GATE = {"max_drop": 10.0, "max_escape_rise": 10.0}
# every number of the comparison; the device record must equal the workstation's on each
COMPARED = ("num_samples", "top1_agreement", "accuracy", "balanced_accuracy", "float_accuracy",
            "float_balanced_accuracy", "balanced_accuracy_delta", "escape_rate", "float_escape_rate",
            "escape_rate_delta", "flips", "confusion_matrix", "float_confusion_matrix", "max_drop", "max_escape_rise",
            "passed", "stage", "precision", "classes", "artifact", "artifact_sha256", "backend", "data")
DEVICE_PYTHON = Path(__file__).resolve().parents[1] / "scripts" / "device_python"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("device") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=PX, epochs=20, ok_class="ok"))
    write_ptq_calibration(out)
    for precision in ("fp32", "int8"):
        export_artifact(out, ExportConfig(precision=precision, **GATE))
    export_artifact(out, ExportConfig(precision="int8", target="tensorrt", **GATE))
    return out


@pytest.fixture(scope="module")
def device_data(run_dir, tmp_path_factory):
    """Only the validation images, copied with their class folders: what a device gets."""
    run_info = read_json(run_dir / "run.json")
    root = tmp_path_factory.mktemp("device_images") / "images"
    for rel in run_info["split"]["val_files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(run_info["data_dir"]) / rel, root / rel)
    return root


ARTIFACTS = ("model.float.fp32.onnx", "model.float.int8.onnx", "model.float.int8-trt.onnx")


def test_pack_holds_the_float_logits_of_the_validation_images(run_dir):
    pack_file = pack_path(run_dir, "float")
    pack = read_pack(pack_file)
    run_info = read_json(run_dir / "run.json")
    records = run_records(run_info, "val")
    assert list(pack.files) == run_info["split"]["val_files"] and len(records) >= 8
    assert list(pack.sha256) == [sha256_file(record.path) for record in records]
    assert list(pack.labels) == [record.label for record in records]
    assert list(pack.classes) == run_info["classes"] and pack.ok_class == "ok"
    assert (pack.max_drop, pack.max_escape_rise) == (GATE["max_drop"], GATE["max_escape_rise"])
    # an independent oracle: fine-tuning's own prediction path on the same images
    model, _ = load_checkpoint(run_dir)
    expected = np.asarray(predict_logits(model, records, PX, run_info["mean"], run_info["std"]))
    np.testing.assert_allclose(pack.float_logits, expected, rtol=0, atol=1e-5)
    # no image tensors: well under a kilobyte per image
    assert pack_file.stat().st_size < 1000 * len(records)
    for name in ARTIFACTS:
        assert read_json(run_dir / "export" / f"{name}.json")["verification_pack"]["sha256"] == sha256_file(pack_file)


def test_pack_is_reused_while_current_and_rewritten_when_the_gate_changes(run_dir):
    pack_file = pack_path(run_dir, "float")
    before = pack_file.stat().st_mtime_ns, sha256_file(pack_file)
    export_artifact(run_dir, ExportConfig(precision="fp32", **GATE))
    assert (pack_file.stat().st_mtime_ns, sha256_file(pack_file)) == before
    manifest = export_artifact(run_dir, ExportConfig(precision="fp32", max_drop=2.0, max_escape_rise=10.0))
    assert read_pack(pack_file).max_drop == 2.0 and manifest["verification_pack"]["sha256"] != before[1]
    export_artifact(run_dir, ExportConfig(precision="fp32", **GATE))
    assert read_pack(pack_file).max_drop == GATE["max_drop"]


@pytest.mark.parametrize("name", ARTIFACTS)
def test_device_verify_equals_the_workstation_verify(run_dir, device_data, name, tmp_path):
    artifact = run_dir / "export" / name
    workstation = verify(run_dir, artifact, **GATE)
    device = verify_with_pack(artifact, pack_path(run_dir, "float"), device_data, out=tmp_path / "record.json")
    assert {key: device[key] for key in COMPARED} == {key: workstation[key] for key in COMPARED}
    assert device["max_abs_diff"] == pytest.approx(workstation["max_abs_diff"], abs=1e-5)
    assert read_json(tmp_path / "record.json") == device
    assert device["float_reference"]["pack_sha256"] == sha256_file(pack_path(run_dir, "float"))


def test_changed_or_missing_images_are_one_line_errors(run_dir, device_data, tmp_path, capsys):
    copy = tmp_path / "images"
    shutil.copytree(device_data, copy)
    first = sorted(p for p in copy.rglob("*") if p.is_file())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    artifact = run_dir / "export" / "model.float.fp32.onnx"
    with pytest.raises(DatasetError, match="1 images in .* differ from the pack"):
        verify_with_pack(artifact, pack_path(run_dir, "float"), copy, out=tmp_path / "record.json")
    code = main(["verify", str(artifact), "--pack", str(pack_path(run_dir, "float")), "--data", str(copy),
                 "--out", str(tmp_path / "record.json")])
    err = capsys.readouterr().err
    assert code == 2 and "differ from the pack" in err and "Traceback" not in err
    first.unlink()
    with pytest.raises(DatasetError, match="1 of the pack's .* images are not in"):
        verify_with_pack(artifact, pack_path(run_dir, "float"), copy)
    assert not (tmp_path / "record.json").exists()


def test_a_pack_of_another_stage_or_preprocessing_is_refused(run_dir, device_data, tmp_path):
    raw = read_json(pack_path(run_dir, "float"))
    artifact = run_dir / "export" / "model.float.fp32.onnx"
    for change, message in ((("stage", "pruned"), "holds the pruned model's logits"),
                            (("crop", 0.875), "declares centre crop 1.0 but the pack"),
                            (("float_logits", raw["float_logits"][:-1]), "not a usable verification pack")):
        edited = dict(raw, **{change[0]: change[1]})
        path = tmp_path / "pack.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(ArtifactError, match=message):
            verify_with_pack(artifact, path, device_data)


def test_implicit_int8_pair_is_the_quantized_weights_with_their_cache(run_dir):
    from calibrate.tensorrt_cache import read_calibration_cache

    folder = run_dir / "export"
    manifest = read_json(folder / "model.float.int8-implicit.onnx.json")
    cache_file = folder / "model.float.int8-implicit.calib"
    assert manifest["calibration_cache"]["sha256"] == sha256_file(cache_file)
    assert manifest["sha256"] == sha256_file(folder / "model.float.int8-implicit.onnx")
    assert manifest["metadata"]["precision"] == "fp32" and manifest["metadata"]["int8_calibration"] == "implicit"
    assert manifest["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(folder / "model.float.int8-implicit.onnx")).graph
    names = {value for node in graph.node for value in node.output} | {value.name for value in graph.input}
    scales = read_calibration_cache(cache_file).scales
    assert len(scales) >= len([n for n in graph.node if n.op_type == "Conv"]) and set(scales) <= names
    assert all(scale > 0 for scale in scales.values())


def test_engine_from_onnx_checks_the_request_before_tensorrt(run_dir, tmp_path):
    folder = run_dir / "export"
    static = tmp_path / "static.onnx"
    export_artifact(run_dir, ExportConfig(precision="fp32", dynamic_batch=False, **GATE))
    shutil.copy(folder / "model.float.fp32.onnx", static)
    export_artifact(run_dir, ExportConfig(precision="fp32", **GATE))  # restore the dynamic-batch file
    with pytest.raises(ConfigError, match="fixed batch of 1; --max-batch 8"):
        build_engine_from_onnx(static, EngineConfig(precision="fp16", max_batch=8))
    with pytest.raises(ConfigError, match="--precision fp32 is not an engine precision"):
        build_engine_from_onnx(folder / "model.float.fp32.onnx", EngineConfig(precision="fp32"))
    bare = onnx.load(str(folder / "model.float.fp32.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match="lacks the metadata stage, precision"):
        build_engine_from_onnx(tmp_path / "bare.onnx", EngineConfig(precision="fp16"))
    if importable("tensorrt"):
        pytest.skip("TensorRT is installed: the missing-TensorRT message is not reachable")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_engine_from_onnx(folder / "model.float.fp32.onnx", EngineConfig(precision="fp16"))
    assert not list(folder.glob("*.engine*")) and not list(folder.glob(".engine-*"))


def _device(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """``edge-tl ARGV`` in a fresh interpreter where torch, torchvision, timm, NNI and safetensors
    cannot be imported (as in the light device install)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DEVICE_PYTHON), str(Path(__file__).resolve().parents[1])]))
    return subprocess.run([sys.executable, "-m", "edge_tl", *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


def test_device_side_runs_without_torch_timm_or_nni(run_dir, device_data, tmp_path):
    probe = _device(tmp_path, "--help")
    assert probe.returncode == 0, probe.stderr
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(DEVICE_PYTHON)), timeout=60)
    assert blocked.returncode != 0 and "not installed on this device" in blocked.stderr
    # a device gets the artifacts and the pack only, not the run directory
    device = tmp_path / "device"
    device.mkdir()
    for name in ("model.float.int8.onnx", "model.float.int8.onnx.json", "verify-pack.float.json"):
        shutil.copy(run_dir / "export" / name, device / name)
    artifact, pack = device / "model.float.int8.onnx", device / "verify-pack.float.json"

    done = _device(tmp_path, "verify", str(artifact), "--pack", str(pack), "--data", str(device_data))
    workstation = verify(run_dir, run_dir / "export" / "model.float.int8.onnx", **GATE)
    assert done.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[workstation["verdict"]], done.stderr
    record = read_json(device / "verify" / "model.float.int8.onnx.json")
    assert {key: record[key] for key in COMPARED} == {key: workstation[key] for key in COMPARED}

    predicted = _device(tmp_path, "predict", str(artifact), str(device_data), "--out", str(tmp_path / "p.csv"))
    assert predicted.returncode == 0, predicted.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + record["num_samples"]

    timed = _device(tmp_path, "bench", str(artifact), "--backends", "onnxruntime", "--batch", "1", "--warmup", "1",
                    "--min-time", "0.05")
    assert timed.returncode == 0 and "onnxruntime" in timed.stdout, timed.stderr

    copied = tmp_path / "copied_run"  # a run directory copied to the device: its report needs no torch
    shutil.copytree(run_dir, copied)
    reported = _device(tmp_path, "report", str(copied))
    assert reported.returncode == 0 and (copied / "report.md").is_file(), reported.stderr

    for argv, needs in ((("finetune", str(device_data), "--out", str(tmp_path / "r")), "torch"),
                        (("prune", str(run_dir)), "torch"),
                        (("verify", str(run_dir), str(artifact)), "torch"),
                        (("export", str(run_dir), "--precision", "fp32"), "torch")):
        refused = _device(tmp_path, *argv)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and needs in lines[0], refused.stderr
        assert "pip install 'edge-tl[train]'" in lines[0] and "Traceback" not in refused.stderr
    assert not (tmp_path / "r").exists()

    if not importable("tensorrt"):
        engine = _device(tmp_path, "export", str(artifact.with_name("model.float.int8.onnx")), "--format", "engine",
                         "--precision", "fp16")
        assert engine.returncode == 2 and "TensorRT is not installed" in engine.stderr, engine.stderr


def test_an_artifact_of_another_run_is_refused_by_verify_and_bench(run_dir, tmp_path):
    from edge_tl.artifacts import atomic_write_json
    from edge_tl.bench import BenchConfig, benchmark

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("verify"))
    manifest_file = copy / "export" / "model.float.fp32.onnx.json"
    atomic_write_json(manifest_file, dict(read_json(manifest_file), run_json_sha256="0" * 64))
    with pytest.raises(ArtifactError, match="was exported from another run"):
        verify(copy, copy / "export" / "model.float.fp32.onnx", **GATE)
    with pytest.raises(ArtifactError, match="was exported from another run"):
        benchmark(copy, BenchConfig(backends=("onnxruntime",), batch_sizes=(1,), warmup=1, min_time_s=0.01))
    assert not (copy / "verify" / "model.float.fp32.onnx.json").exists()


def test_training_split_evidence_is_the_same_from_the_pack_recomputed_and_on_the_device(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("verify"))
    artifact = copy / "export" / "model.float.int8.onnx"
    export_artifact(copy, ExportConfig(precision="int8", unlabelled="train", **GATE))
    pack = read_pack(pack_path(copy, "float"))
    run_info = read_json(copy / "run.json")
    assert pack.unlabelled == "train" and list(pack.unlabelled_files) == run_info["split"]["train_files"]
    from_pack = verify(copy, artifact, unlabelled="train", **GATE)  # the float side read from the pack
    pack_path(copy, "float").unlink()
    recomputed = verify(copy, artifact, unlabelled="train", **GATE)  # the float side run again
    keys = COMPARED + ("unlabelled", "statistics")
    assert {k: from_pack[k] for k in keys} == {k: recomputed[k] for k in keys}
    assert from_pack["unlabelled"]["num_images"] == len(run_info["split"]["train_files"])
    assert from_pack["unlabelled"]["source"] == "train" and "optimistic" in from_pack["unlabelled"]["note"]

    export_artifact(copy, ExportConfig(precision="int8", unlabelled="train", **GATE))  # the pack again
    images = tmp_path / "images"  # the device gets the validation and the training images
    for rel in run_info["split"]["val_files"] + run_info["split"]["train_files"]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(run_info["data_dir"]) / rel, images / rel)
    device = verify_with_pack(artifact, pack_path(copy, "float"), images, out=tmp_path / "record.json")
    assert {k: device[k] for k in keys} == {k: from_pack[k] for k in keys}
    without = verify_with_pack(artifact, pack_path(copy, "float"), images, unlabelled="none",
                               out=tmp_path / "record.json")
    assert "unlabelled" not in without and without["top1_agreement"] == device["top1_agreement"]
    with pytest.raises(ConfigError, match="label-free evidence from a folder needs the float model"):
        verify_with_pack(artifact, pack_path(copy, "float"), images, unlabelled=str(images))
