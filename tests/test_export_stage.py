"""export/stage.py: a fine-tuned run directory -> FP32/FP16/INT8 ONNX files with metadata and manifests."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from calibrate.calibration_file import write_calibration
from calibrate.observe import collect_calibration, output_layers
from calibrate.sources import ClassBalancedSource
from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json, read_json, save_weights, sha256_file
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint, run_records
from edge_tl.fold import fold_batchnorm
from export.onnx_export import PARITY_TOLERANCE, parity_input
from export.onnx_metadata import ort_session, read_onnx_metadata
from export.stage import ExportConfig, artifact_name, export_artifact, validate_config
from export.tensorrt_build import check_qdq_for_tensorrt
from helpers import write_ptq_calibration

PX = 64
VERSION_KEYS = {"edge_tl", "python", "torch", "onnx", "onnxruntime", "numpy"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export_stage") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=PX, epochs=3, ok_class="ok"))
    write_ptq_calibration(out)
    return out


@pytest.fixture(scope="module")
def exported(run_dir):
    torch.set_num_threads(1)
    return {precision: export_artifact(run_dir, ExportConfig(precision=precision)) for precision in ("fp32", "fp16", "int8")}


def _copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "verify"))
    return copy


def test_exports_write_named_files_and_manifests(run_dir, exported):
    run_info = read_json(run_dir / "run.json")
    folder = run_dir / "export"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"model.float.{p}.onnx{suffix}" for p in ("fp32", "fp16", "int8") for suffix in ("", ".json")]
        + ["verify-pack.float.json"])
    pack_sha256 = sha256_file(folder / "verify-pack.float.json")
    for precision, manifest in exported.items():
        path = folder / f"model.float.{precision}.onnx"
        assert manifest["path"] == str(path)
        on_disk = read_json(f"{path}.json")
        assert on_disk == {key: value for key, value in manifest.items() if key != "path"}
        assert on_disk["sha256"] == sha256_file(path) and on_disk["size_bytes"] == path.stat().st_size
        assert on_disk["opset"] == 17 and on_disk["stage"] == "float" and on_disk["precision"] == precision
        assert set(on_disk["versions"]) == VERSION_KEYS
        assert on_disk["verification_pack"] == {"file": "verify-pack.float.json", "sha256": pack_sha256}
        metadata = read_onnx_metadata(path)
        assert metadata["precision"] == precision and metadata["stage"] == "float"
        assert metadata["class_names"] == run_info["classes"] == ["crack", "ok", "scratch", "spot"]
        assert metadata["mean"] == run_info["mean"] and metadata["std"] == run_info["std"]
        assert metadata["input_size"] == [PX, PX] and metadata["ok_class"] == "ok"
        assert on_disk["metadata"] == metadata
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert exported["fp32"]["max_abs_diff"] <= 1e-4
    # FP16 error grows with the logits' magnitude: the export's stated tolerance, 2e-2 of the largest logit on the
    # parity input (at least 1); over seven heads of this fixture it measured 0.2-1.7 % of the scale
    model, _ = load_checkpoint(run_dir)
    with torch.no_grad():
        logit_scale = max(1.0, float(model(torch.from_numpy(parity_input(PX, 2))).abs().max()))
    assert exported["fp16"]["max_abs_diff"] <= PARITY_TOLERANCE["fp16"] * logit_scale
    assert exported["fp16"]["max_abs_diff_vs_fp32"] <= PARITY_TOLERANCE["fp16"] * logit_scale
    assert exported["fp16"]["size_bytes"] < 0.55 * exported["fp32"]["size_bytes"]
    assert exported["int8"]["size_bytes"] < exported["fp32"]["size_bytes"] / 3.0


def test_parity_numbers_are_measured_against_pytorch(run_dir, exported):
    model, _ = load_checkpoint(run_dir)
    x = parity_input(PX, 2)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for precision in ("fp32", "fp16"):
        got = ort_session(run_dir / "export" / f"model.float.{precision}.onnx").run(None, {"input": x})[0]
        assert float(np.max(np.abs(got - expected))) == pytest.approx(exported[precision]["max_abs_diff"], rel=1e-6)


def test_int8_manifest_names_its_calibration(run_dir, exported):
    model, _ = load_checkpoint(run_dir)
    with torch.no_grad():
        logit_scale = max(1.0, float(model(torch.from_numpy(parity_input(PX, 2))).abs().max()))
    manifest = exported["int8"]
    calibration_json = run_dir / "quantized" / "float" / "calibration.json"
    assert manifest["calibration"]["sha256"] == sha256_file(calibration_json)
    assert manifest["calibration"]["path"] == "quantized/float/calibration.json"
    assert manifest["calibration"]["weights"] == "stage" and manifest["calibration"]["method"] == "minmax"
    assert manifest["qdq_target"] == "onnxruntime" and manifest["int8"]["activation_dtype"] == "uint8"
    assert manifest["int8"]["ort_ops"].get("QLinearConv", 0) == manifest["int8"]["quantized_weights"] - 1  # + QGemm
    assert manifest["int8"]["float_activations"] == []
    # helpers.write_ptq_calibration records every layer, the head included: all of them are quantized
    assert manifest["int8"]["float_layers"] == [] and manifest["calibration"]["float_modules"] == []
    assert 0.0 < manifest["max_abs_diff"] <= PARITY_TOLERANCE["int8"] * logit_scale  # the export's stated tolerance
    # top-1 agreement on the validation images (on the noise parity input the tiny head's logits nearly tie)
    images = data_mod.load_tensor_batch(run_records(read_json(run_dir / "run.json"), "val"), PX,
                                        *(read_json(run_dir / "run.json")[key] for key in ("mean", "std")))
    with torch.no_grad():
        float_top1 = model(torch.from_numpy(images)).numpy().argmax(1)
    got = ort_session(manifest["path"]).run(None, {"input": images})[0]
    assert np.mean(got.argmax(1) == float_top1) >= 0.5


def test_golden_image_through_onnx_metadata(run_dir, exported, surface_dataset, tmp_path):
    """A runtime that knows only the ONNX file's metadata feeds it the way PyTorch was fed."""
    source = sorted((surface_dataset / "scratch").iterdir())[0]
    golden = tmp_path / "golden.png"
    Image.open(source).convert("RGB").resize((97, 81), Image.Resampling.NEAREST).save(golden)
    path = run_dir / "export" / "model.float.fp32.onnx"
    meta = read_onnx_metadata(path)
    assert meta["channel_order"] == "RGB" and meta["layout"] == "NCHW" and meta["normalization"] == "(rgb / 255 - mean) / std"
    width, height = meta["input_size"]
    rgb = np.asarray(Image.open(golden).convert("RGB").resize((width, height), Image.Resampling.BILINEAR), np.float32)
    fed = ((rgb * np.float32(meta["pixel_scale"]) - np.float32(meta["mean"])) / np.float32(meta["std"])).transpose(2, 0, 1)
    got = ort_session(path).run([meta["output_name"]], {meta["input_name"]: fed[None].astype(np.float32)})[0]

    model, run_info = load_checkpoint(run_dir)
    reference = data_mod.preprocess(data_mod.load_image(golden), run_info["img_size"], run_info["mean"], run_info["std"])
    np.testing.assert_allclose(fed, reference, atol=1e-6)
    with torch.no_grad():
        expected = model(torch.from_numpy(reference[None])).numpy()
    assert float(np.max(np.abs(got - expected))) <= 1e-4
    assert meta["class_names"][int(got.argmax())] == run_info["classes"][int(expected.argmax())]


def test_tensorrt_qdq_flavour_is_symmetric_int8(run_dir, exported):
    manifest = export_artifact(run_dir, ExportConfig(precision="int8", target="tensorrt"))
    path = run_dir / "export" / "model.float.int8-trt.onnx"
    assert manifest["path"] == str(path) and (run_dir / "export" / "model.float.int8-trt.onnx.json").is_file()
    assert read_onnx_metadata(path)["qdq_target"] == "tensorrt" and manifest["int8"]["activation_dtype"] == "int8"
    assert check_qdq_for_tensorrt(onnx.load(str(path))) == manifest["int8"]["quantized_activations"]
    with pytest.raises(ConfigError, match="TensorRT needs symmetric int8"):
        check_qdq_for_tensorrt(onnx.load(str(run_dir / "export" / "model.float.int8.onnx")))


def test_float_head_calibration_exports_a_float_gemm_in_both_flavours(run_dir, exported, tmp_path):
    """calibration.json without head entries (what `edge-tl quantize` writes by default) -> float Gemm."""
    run = _copy_run(run_dir, tmp_path)
    model, run_info = load_checkpoint(run)
    folded = fold_batchnorm(model)
    source = ClassBalancedSource(run_records(run_info, "train"), 64, PX, run_info["mean"], run_info["std"],
                                 batch_size=16, min_images=1)
    calibration = collect_calibration(folded, source, model_info={"stage": "float", "img_size": PX, "mode": "ptq"},
                                      float_modules=output_layers(folded))
    write_calibration(run / "quantized" / "float" / "calibration.json", calibration)
    images = data_mod.load_tensor_batch(run_records(run_info, "val"), PX, run_info["mean"], run_info["std"])
    with torch.no_grad():
        float_logits = model(torch.from_numpy(images)).numpy()
    for target in ("onnxruntime", "tensorrt"):
        manifest = export_artifact(run, ExportConfig(precision="int8", target=target))
        assert manifest["calibration"]["float_modules"] == ["head"] and manifest["int8"]["float_layers"] == ["head"]
        assert manifest["int8"]["quantized_weights"] == exported["int8"]["int8"]["quantized_weights"] - 1
        graph = onnx.load(manifest["path"]).graph
        (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
        floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
        assert gemm.input[1] in floats and gemm.input[2] in floats  # weight and bias read directly, no Q/DQ
        got = ort_session(manifest["path"]).run(None, {"input": images})[0]
        # the bound of the all-int8 export above: this tiny 64 px model quantizes coarsely (5-8 of 8 agree)
        assert np.mean(got.argmax(1) == float_logits.argmax(1)) >= 0.5
    ops = read_json(run / "export" / "model.float.int8.onnx.json")["int8"]["ort_ops"]
    assert ops.get("QLinearConv") == manifest["int8"]["quantized_weights"] and "QGemm" not in ops
    check_qdq_for_tensorrt(onnx.load(manifest["path"]))  # the TensorRT flavour is still symmetric int8 throughout


def test_qat_weights_are_used_and_stated(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    model, _ = load_checkpoint(run)
    tuned = fold_batchnorm(model)
    with torch.no_grad():  # stands in for QAT-tuned weights: a head that ranks the classes in reverse
        tuned.head.weight.neg_()
        tuned.head.bias.neg_()
    save_weights(run / "quantized" / "float" / "model.safetensors", tuned.state_dict(), {"mode": "qat"})
    write_ptq_calibration(run, model=tuned, mode="qat")
    manifest = export_artifact(run, ExportConfig(precision="int8"))
    assert manifest["calibration"]["weights"] == "tuned" and "tuned weights" in manifest["parity_reference"]
    assert manifest["calibration"]["tuned_weights_sha256"] == sha256_file(run / "quantized" / "float" / "model.safetensors")
    assert read_onnx_metadata(manifest["path"])["int8_weights"] == "tuned"
    run_info = read_json(run / "run.json")
    images = data_mod.load_tensor_batch(run_records(run_info, "val"), PX, run_info["mean"], run_info["std"])
    got = ort_session(manifest["path"]).run(None, {"input": images})[0]
    with torch.no_grad():
        tuned_logits, stage_logits = tuned(torch.from_numpy(images)).numpy(), model(torch.from_numpy(images)).numpy()
    assert np.mean(got.argmax(1) == tuned_logits.argmax(1)) >= 0.75
    assert np.mean(np.abs(got - tuned_logits)) < 0.25 * np.mean(np.abs(got - stage_logits))

    (run / "quantized" / "float" / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="refers to tuned weights but .*model.safetensors is missing"):
        export_artifact(run, ExportConfig(precision="int8"))


def test_int8_export_checks_the_quantized_files_against_their_sha256(run_dir, tmp_path):
    """What quantize pins: the tuned weights by calibration.json's sha256, every file by metrics.json's."""
    run = _copy_run(run_dir, tmp_path)
    out = run / "quantized" / "float"
    model, _ = load_checkpoint(run)
    tuned = fold_batchnorm(model)
    save_weights(out / "model.safetensors", tuned.state_dict(), {"mode": "qat"})
    write_ptq_calibration(run, model=tuned, mode="qat")
    document = read_json(out / "calibration.json")
    document["model"]["tuned_weights_sha256"] = sha256_file(out / "model.safetensors")
    atomic_write_json(out / "calibration.json", document)

    def pin_files():
        atomic_write_json(out / "metrics.json", {"files": {name: sha256_file(out / name)
                                                           for name in ("calibration.json", "model.safetensors")}})

    pin_files()
    assert export_artifact(run, ExportConfig(precision="int8"))["calibration"]["weights"] == "tuned"
    before = {path.name: sha256_file(path) for path in (run / "export").iterdir()}
    with torch.no_grad():
        tuned.head.bias.add_(1.0)
    save_weights(out / "model.safetensors", tuned.state_dict(), {"mode": "qat"})
    with pytest.raises(ArtifactError, match="model.safetensors is missing or changed since quantize wrote it"):
        export_artifact(run, ExportConfig(precision="int8"))
    pin_files()  # metrics.json agrees with the new weights: calibration.json's own pin still refuses them
    with pytest.raises(ArtifactError, match="model.safetensors changed since quantize wrote it"):
        export_artifact(run, ExportConfig(precision="int8"))
    (out / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors changed since quantize wrote it"):
        export_artifact(run, ExportConfig(precision="int8"))
    assert {path.name: sha256_file(path) for path in (run / "export").iterdir()} == before


def test_an_export_beyond_its_parity_tolerance_is_refused_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    from export import onnx_export

    run = _copy_run(run_dir, tmp_path)
    manifest = export_artifact(run, ExportConfig(precision="fp16"))
    assert manifest["max_abs_diff"] <= manifest["max_abs_diff_tolerance"]
    assert manifest["max_abs_diff_tolerance"] == pytest.approx(onnx_export.PARITY_TOLERANCE["fp16"] * manifest["logit_scale"])
    before = {path.name: sha256_file(path) for path in (run / "export").iterdir()}
    # a tolerance no export meets stands for a broken export
    monkeypatch.setitem(onnx_export.PARITY_TOLERANCE, "fp32", -1.0)
    with pytest.raises(ArtifactError, match=r"model.float.fp32.onnx: max \|ONNX - PyTorch\| .* exceeds the fp32 tolerance"):
        export_artifact(run, ExportConfig(precision="fp32"))
    assert {path.name: sha256_file(path) for path in (run / "export").iterdir()} == before


def test_missing_calibration_is_a_clear_error_and_writes_nothing(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    shutil.rmtree(run / "quantized")
    with pytest.raises(ArtifactError, match=r"run `edge-tl quantize .* --stage float` first"):
        export_artifact(run, ExportConfig(precision="int8"))
    assert not (run / "export").exists()


def test_failed_export_leaves_previous_artifacts_untouched(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    good = export_artifact(run, ExportConfig(precision="int8"))
    before = {p.name: sha256_file(p) for p in (run / "export").iterdir()}
    path = run / "quantized" / "float" / "calibration.json"
    document = read_json(path)
    head = next(entry for entry in document["tensors"] if entry["name"] == "head:weight")
    for key in ("scale", "zero_point", "min", "max"):  # valid file, but for a 3-class head
        head[key] = head[key][:-1]
    atomic_write_json(path, document)
    with pytest.raises(ArtifactError, match="calibration weight scales of head have 3 channels, the model has 4"):
        export_artifact(run, ExportConfig(precision="int8"))
    assert {p.name: sha256_file(p) for p in (run / "export").iterdir()} == before  # no temp or partial files
    assert read_json(run / "export" / "model.float.int8.onnx.json")["sha256"] == good["sha256"]


def test_stage_and_precision_mismatches_are_artifact_errors(run_dir, tmp_path):
    with pytest.raises(ArtifactError, match=r"pruned does not exist; run `edge-tl prune"):
        export_artifact(run_dir, ExportConfig(stage="pruned"))
    run = _copy_run(run_dir, tmp_path)
    path = run / "quantized" / "float" / "calibration.json"
    document = read_json(path)
    atomic_write_json(path, {**document, "model": {**document["model"], "img_size": 96}})
    with pytest.raises(ArtifactError, match="made at 96 px, the run uses 64 px"):
        export_artifact(run, ExportConfig(precision="int8"))
    with pytest.raises(ArtifactError, match="not a run directory"):
        export_artifact(tmp_path / "nowhere", ExportConfig())


@pytest.mark.parametrize("cfg, message", [
    (ExportConfig(format="tflite"), "--format 'tflite' is not one of onnx, engine"),
    (ExportConfig(precision="int4"), "--precision 'int4' is not one of fp32, fp16, int8"),
    (ExportConfig(stage="distilled"), "--stage 'distilled' is not one of float, pruned"),
    (ExportConfig(target="openvino"), "Q/DQ target 'openvino' is not one of onnxruntime, tensorrt"),
    (ExportConfig(format="engine", precision="fp32"), "--format engine needs --precision fp16 or int8"),
    (ExportConfig(opset=11), "--opset 11 is not supported; use 13 to 21"),
    (ExportConfig(workspace_mb=0), "--workspace 0 must be an integer number of MB >= 1"),
    (ExportConfig(dla_core=0), "--dla-core, --max-batch and --timing-cache apply to --format engine only"),
])
def test_bad_settings_fail_before_any_work(cfg, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)
    with pytest.raises(ConfigError):
        export_artifact(tmp_path / "not-a-run", cfg)  # settings are checked before the run directory


def test_artifact_names():
    assert artifact_name("float", "fp32") == "model.float.fp32.onnx"
    assert artifact_name("pruned", "int8") == "model.pruned.int8.onnx"
    assert artifact_name("pruned", "int8", target="tensorrt") == "model.pruned.int8-trt.onnx"
    assert artifact_name("float", "fp16", target="tensorrt") == "model.float.fp16.onnx"
    assert artifact_name("float", "int8", "engine") == "model.float.int8.engine"


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed; this checks the message without it")
def test_engine_without_tensorrt_is_backend_unavailable(run_dir):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        export_artifact(run_dir, ExportConfig(format="engine", precision="fp16"))
    assert not list((run_dir / "export").glob("*.engine*"))


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT and an NVIDIA GPU (pip install 'edge-tl[tensorrt]')")
def test_int8_engine_from_qdq_with_cache(run_dir):
    manifest = export_artifact(run_dir, ExportConfig(format="engine", precision="int8"))
    folder = run_dir / "export"
    assert manifest["path"] == str(folder / "model.float.int8.engine")
    assert read_json(folder / "model.float.int8.engine.manifest.json")["metadata"]["stage"] == "float"
    assert manifest["calibration"]["sha256"] == sha256_file(run_dir / "quantized" / "float" / "calibration.json")
    assert manifest["convolution_input_types"].get("int8", 0) > 0
    if manifest["calibration_cache"]:
        from calibrate.tensorrt_cache import read_calibration_cache

        assert read_calibration_cache(folder / manifest["calibration_cache"]).scales
