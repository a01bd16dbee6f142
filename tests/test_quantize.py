"""INT8 quantization with NNI on a tiny fine-tuned EfficientNet-Lite0 run (generated images, 64 px)."""
from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from calibrate.calibration_file import read_calibration
from calibrate.sources import ClassBalancedSource, iter_batches
from edge_tl.artifacts import load_weights
from edge_tl.data import load_tensor_batch, scan_image_folder
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint, run_records
from edge_tl.fold import fold_batchnorm
from edge_tl.metrics import classification_metrics
from edge_tl.synthetic import make_surface_dataset
from edge_tl.quantize import (
    QuantizeConfig,
    load_quantized_model,
    quantization_plan,
    quantize,
    validate_config,
)
from export.onnx_metadata import ort_session
from export.stage import ExportConfig, export_artifact

METRIC_KEYS = {"classes", "num_samples", "accuracy", "balanced_accuracy", "per_class", "confusion_matrix",
               "ok_class", "escape_rate", "false_reject_rate", "balanced_accuracy_delta",
               "float_balanced_accuracy", "mode", "method", "calib_images", "float_head", "float_modules"}
# A deliberately narrow activation range: clipping at the 99.9th percentile costs this tiny model
# accuracy in PTQ (through the stem: with the default float stem it loses none), which QAT (from
# those ranges, distilling from the float model) wins back.
NARROW = QuantizeConfig(method="percentile", percentile=99.9, float_stem=False, reconstruct=False)


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=64, epochs=3, ok_class="ok"))
    return out


@pytest.fixture(scope="module")
def folded_float(run_dir) -> torch.nn.Module:
    """The run's BN-folded float model (build once: treat as read-only, deepcopy to modify)."""
    return fold_batchnorm(load_checkpoint(run_dir)[0])


def _quantized_copy(run_dir, tmp_path_factory, cfg: QuantizeConfig):
    copy = tmp_path_factory.mktemp("quantized") / "run"
    shutil.copytree(run_dir, copy)
    return copy, quantize(copy, cfg)


@pytest.fixture(scope="module")
def ptq(run_dir, tmp_path_factory):
    # plain round-to-nearest PTQ of every layer but the head: the tests below check its
    # calibration against numpy oracles, the stem's included
    return _quantized_copy(run_dir, tmp_path_factory, QuantizeConfig(float_stem=False, reconstruct=False))


@pytest.fixture(scope="module")
def quantized_head_ptq(run_dir, tmp_path_factory):
    return _quantized_copy(run_dir, tmp_path_factory, QuantizeConfig(float_head=False, float_stem=False,
                                                                      reconstruct=False))


@pytest.fixture(scope="module")
def narrow_ptq(run_dir, tmp_path_factory):
    return _quantized_copy(run_dir, tmp_path_factory, NARROW)


@pytest.fixture(scope="module")
def qat(run_dir, tmp_path_factory):
    # two epochs keep the test short; the default is three
    cfg = QuantizeConfig(**{**NARROW.__dict__, "mode": "qat", "qat_epochs": 2})
    return _quantized_copy(run_dir, tmp_path_factory, cfg)


ORACLE_MODULES = ("trunk.blocks.0.0", "trunk.blocks.2.body.0", "trunk.blocks.5.body.3", "trunk.blocks.17.0")


@pytest.fixture(scope="module")
def calibration_inputs(run_dir, folded_float) -> dict[str, np.ndarray]:
    """Inputs of a few layers of the folded float model over the calibration batches quantize uses
    (default settings: every training image, batches of 16, seed 0), collected with forward hooks."""
    cfg = QuantizeConfig()
    run_info = json.loads((run_dir / "run.json").read_text())
    folded = copy.deepcopy(folded_float)
    source = ClassBalancedSource(run_records(run_info, "train"), cfg.calib_images, run_info["img_size"],
                                 run_info["mean"], run_info["std"], batch_size=cfg.batch_size, seed=cfg.seed)
    seen: dict[str, list] = {name: [] for name in ORACLE_MODULES}
    handles = [folded.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: seen[name].append(args[0].numpy().ravel())) for name in ORACLE_MODULES]
    with torch.no_grad():
        for batch in iter_batches(source):
            folded(torch.from_numpy(batch))
    for handle in handles:
        handle.remove()
    return {name: np.concatenate(parts) for name, parts in seen.items()}


def _fake_quant(values: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(values / scale + zero_point), qmin, qmax) - zero_point) * scale


def _simulated_logits(folded: torch.nn.Module, run_dir, images: torch.Tensor) -> torch.Tensor:
    """Logits of a plain-torch fake quantization of ``folded`` built from the quantize artifacts alone:
    calibration.json, and model.safetensors when it holds tuned weights (the model is modified)."""
    with torch.no_grad():
        return _simulated_model(folded, run_dir).eval()(images)


def _simulated_model(folded: torch.nn.Module, run_dir, tuned: bool = True) -> torch.nn.Module:
    out = run_dir / "quantized/float"
    calibration = read_calibration(out / "calibration.json")
    if tuned and (out / "model.safetensors").is_file():
        folded.load_state_dict(load_weights(out / "model.safetensors"), strict=True)
    for tensor in calibration.tensors:
        module = folded.get_submodule(tensor.module)
        if tensor.role == "weight":
            scale = torch.tensor(tensor.scale).reshape([-1] + [1] * (module.weight.dim() - 1))
            with torch.no_grad():
                module.weight.copy_(_fake_quant(module.weight, scale, 0, -127, 127))
        elif tensor.role == "input":
            module.register_forward_pre_hook(
                lambda m, args, t=tensor: (_fake_quant(args[0], t.scale, t.zero_point, 0, 255),))
        else:
            module.register_forward_hook(lambda m, args, out, t=tensor: _fake_quant(out, t.scale, t.zero_point, 0, 255))
    return folded


def _val_images(run_dir) -> tuple[torch.Tensor, np.ndarray, dict]:
    run_info = json.loads((run_dir / "run.json").read_text())
    val = run_records(run_info, "val")
    images = load_tensor_batch(val, run_info["img_size"], run_info["mean"], run_info["std"])
    return torch.from_numpy(images), np.array([r.label for r in val]), run_info


def _simulated_balanced_accuracy(folded: torch.nn.Module, run_dir) -> float:
    images, labels, run_info = _val_images(run_dir)
    predictions = _simulated_logits(copy.deepcopy(folded), run_dir, images).argmax(1).numpy()
    return classification_metrics(labels, predictions, run_info["classes"])["balanced_accuracy"]


def _assert_onnx_follows_the_fake_quantized_model(run_dir, onnx_path, folded: torch.nn.Module) -> None:
    """The INT8 ONNX in ONNX Runtime against the plain-torch simulation of calibration.json: not
    bit-exact (ONNX Runtime quantizes the last conv after its ReLU6 and rounds biases to int32;
    measured on these 8 images: 8/8 agree, mean |ONNX - fake-quant| 0.13 against 0.56 to float)."""
    images, _, _ = _val_images(run_dir)
    simulated = _simulated_logits(copy.deepcopy(folded), run_dir, images).numpy()
    with torch.no_grad():
        float_logits = folded(images).numpy()
    got = ort_session(onnx_path).run(None, {"input": images.numpy()})[0]
    assert np.mean(got.argmax(1) == simulated.argmax(1)) >= 0.85
    assert np.mean(np.abs(got - simulated)) < 0.5 * np.mean(np.abs(got - float_logits))


def test_invalid_settings_fail_before_any_work(tmp_path):
    for cfg, word in ((QuantizeConfig(mode="int4"), "int4"), (QuantizeConfig(method="mse"), "mse"),
                      (QuantizeConfig(stage="sparse"), "sparse"), (QuantizeConfig(calib_images=0), "0"),
                      (QuantizeConfig(float_head="yes"), "float_head 'yes'"),
                      (QuantizeConfig(float_stem="no"), "float_stem 'no'"),
                      (QuantizeConfig(refit_head=1), "refit_head 1"),
                      (QuantizeConfig(mode="qat", qat_epochs=0), "0")):
        with pytest.raises(ConfigError, match=word):
            validate_config(cfg)
        with pytest.raises(ConfigError):
            quantize(tmp_path / "no-such-run", cfg)  # settings are checked before the run is read


def test_pruned_stage_needs_a_pruned_run(run_dir):
    with pytest.raises(ArtifactError, match="edge-tl prune"):
        quantize(run_dir, QuantizeConfig(stage="pruned"))


def test_plan_quantizes_outputs_only_where_no_consumer_requantizes_them(folded_float):
    folded = folded_float
    plan = quantization_plan(folded)
    convs = [n for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert list(plan) == convs  # every Conv2d and Linear, in graph order
    assert plan["trunk.blocks.0.0"] == ("input", "weight")  # stem -> ReLU6 -> depthwise conv
    assert plan["trunk.blocks.1.body.3"] == ("input", "weight")  # projection -> next block's conv
    assert plan["trunk.blocks.2.body.6"] == ("input", "weight", "output")  # projection -> residual add
    assert plan["trunk.blocks.17.0"] == ("input", "weight", "output")  # final conv -> ReLU6 -> pooling
    assert plan["head"] == ("input", "weight", "output")
    # the default float head: the same plan without the layer that produces the logits
    assert quantization_plan(folded, ("head",)) == {name: roles for name, roles in plan.items() if name != "head"}


def test_minmax_ranges_equal_a_numpy_oracle(ptq, calibration_inputs):
    run, result = ptq
    calibration = read_calibration(result.calibration_path)
    assert calibration.method == "minmax" and calibration.model["stage"] == "float"
    assert calibration.model["input_name"] == "input" and calibration.model["mode"] == "ptq"
    for module, values in calibration_inputs.items():
        tensor = calibration.get(module, "input")
        assert tensor.min == pytest.approx(float(values.min()), rel=1e-6, abs=1e-6)
        assert tensor.max == pytest.approx(float(values.max()), rel=1e-6, abs=1e-6)
        low, high = min(values.min(), 0.0), max(values.max(), 0.0)
        assert tensor.scale == pytest.approx((high - low) / 255, rel=1e-6)
        assert tensor.zero_point == round(-low / tensor.scale) and tensor.dtype == "uint8"


def test_weight_scales_are_per_channel_absmax_over_127(ptq, folded_float):
    run, result = ptq
    calibration = read_calibration(result.calibration_path)
    folded = folded_float
    weights = [t for t in calibration.tensors if t.role == "weight"]
    assert len(weights) == len(quantization_plan(folded)) - 1  # all but the float head
    for tensor in weights:
        weight = folded.get_submodule(tensor.module).weight.detach().numpy()
        absmax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        absmax = np.where(absmax > 0, absmax, 1.0)  # an all-zero channel gets 1/127 (FORMAT.md)
        np.testing.assert_allclose(tensor.scale, absmax / 127, rtol=1e-6)
        assert tensor.dtype == "int8" and tensor.axis == 0 and set(tensor.zero_point) == {0}


def test_calibration_images_come_from_the_train_split_only(ptq):
    run, result = ptq
    run_info = json.loads((run / "run.json").read_text())
    files = result.metrics["calibration_files"]
    assert len(files) == result.metrics["calib_images"] == len(run_info["split"]["train_files"])
    assert set(files) == set(run_info["split"]["train_files"])
    assert not set(files) & set(run_info["split"]["val_files"])
    source = ClassBalancedSource(run_records(run_info, "train"), 512, 64, run_info["mean"], run_info["std"])
    expected_hash = source.file_list_hash(run_info["data_dir"])
    assert read_calibration(result.calibration_path).calibration_files_hash == expected_hash


def test_metrics_describe_the_fake_quantized_model(ptq, folded_float):
    run, result = ptq
    on_disk = json.loads((run / "quantized/float/metrics.json").read_text())
    assert on_disk == result.metrics and METRIC_KEYS <= set(on_disk)
    assert on_disk["mode"] == "ptq" and on_disk["method"] == "minmax" and on_disk["ok_class"] == "ok"
    float_metrics = json.loads((run / "metrics.json").read_text())
    assert on_disk["float_balanced_accuracy"] == pytest.approx(float_metrics["balanced_accuracy"])
    expected_delta = 100 * (on_disk["balanced_accuracy"] - on_disk["float_balanced_accuracy"])
    assert on_disk["balanced_accuracy_delta"] == pytest.approx(expected_delta)
    assert not (run / "quantized/float/model.safetensors").exists()
    # NNI's fake quantization is exactly what calibration.json says
    assert _simulated_balanced_accuracy(folded_float, run) == pytest.approx(on_disk["balanced_accuracy"])


def test_head_refit_fits_the_quantized_trunk_features(run_dir, ptq, folded_float, tmp_path):
    """The refit head is the standardised logistic regression on the fake-quantized trunk's training
    features; it is kept only when validation balanced accuracy does not fall, and then exported."""
    from edge_tl.head import fit_linear_head

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = quantize(run, QuantizeConfig(refit_head=True, float_stem=False, reconstruct=False))
    refit = result.metrics["head_refit"]
    plain_ptq = ptq[1].metrics["balanced_accuracy"]
    assert refit["balanced_accuracy_before"] == pytest.approx(plain_ptq)
    assert refit["kept"] == (refit["balanced_accuracy_after"] >= plain_ptq)
    assert result.metrics["balanced_accuracy"] == pytest.approx(max(refit["balanced_accuracy_after"], plain_ptq))
    calibration = read_calibration(result.calibration_path)
    weights = run / "quantized/float/model.safetensors"
    assert calibration.model["tuned_weights"] == refit["kept"] == weights.is_file()
    if refit["kept"]:
        run_info = json.loads((run / "run.json").read_text())
        train = run_records(run_info, "train")
        images = torch.from_numpy(load_tensor_batch(train, run_info["img_size"], run_info["mean"], run_info["std"]))
        quantized = _simulated_model(copy.deepcopy(folded_float), run, tuned=False).eval()
        with torch.no_grad():
            features = quantized.trunk(images)
        oracle = fit_linear_head(features, np.array([r.label for r in train]), len(run_info["classes"]),
                                 run_info["config"]["head_l2"])
        saved = load_weights(weights)
        # the plain-torch simulation rounds the last conv after its ReLU6, NNI before it: features
        # differ by a rounding step there, so the two fits make the same decisions, not the same weights
        saved_head = torch.nn.Linear(features.shape[1], len(run_info["classes"]))
        saved_head.load_state_dict({"weight": saved["head.weight"], "bias": saved["head.bias"]})
        with torch.no_grad():
            agreement = (saved_head(features).argmax(1) == oracle(features).argmax(1)).float().mean()
        assert agreement >= 0.9, agreement
        assert not torch.allclose(saved["head.weight"], folded_float.head.weight)


def test_float_head_has_no_calibration_entry_and_off_restores_it(ptq, quantized_head_ptq, folded_float):
    (_, result), (head_run, head_result) = ptq, quantized_head_ptq
    calibration, with_head = read_calibration(result.calibration_path), read_calibration(head_result.calibration_path)
    assert result.metrics["float_head"] and result.metrics["float_modules"] == ["head"]
    assert calibration.float_modules == ("head",) and not [t for t in calibration.tensors if t.module == "head"]
    # float_head=False is the old behaviour: the head's input, weight and output entries, nothing else changes
    assert not head_result.metrics["float_head"] and with_head.float_modules == ()
    assert [t.role for t in with_head.tensors if t.module == "head"] == ["input", "weight", "output"]
    assert tuple(t for t in with_head.tensors if t.module != "head") == calibration.tensors
    assert {t.module for t in with_head.tensors} == set(quantization_plan(folded_float))
    assert _simulated_balanced_accuracy(folded_float, head_run) == pytest.approx(head_result.metrics["balanced_accuracy"])


def test_onnx_int8_follows_the_fake_quantized_model_with_a_float_head(ptq, folded_float):
    """NNI's fake quantization (simulated from calibration.json) and the exported Q/DQ ONNX in ONNX Runtime."""
    run, result = ptq
    manifest = export_artifact(run, ExportConfig(precision="int8"))
    ops = manifest["int8"]["ort_ops"]
    assert manifest["int8"]["float_layers"] == ["head"] and manifest["calibration"]["float_modules"] == ["head"]
    assert ops.get("QLinearConv") == manifest["int8"]["quantized_weights"] == 49  # the whole trunk fuses
    assert ops.get("Gemm") == 1 and "QGemm" not in ops
    _assert_onnx_follows_the_fake_quantized_model(run, manifest["path"], folded_float)


@pytest.fixture(scope="module")
def float_stem_ptq(run_dir, tmp_path_factory):
    return _quantized_copy(run_dir, tmp_path_factory, QuantizeConfig(reconstruct=False))  # default float stem


def test_default_float_stem_stays_float_through_the_onnx_export(float_stem_ptq, ptq, folded_float):
    """The stem (the convolution reading the image) gets no calibration.json entry by default: ONNX
    Runtime runs it as a float Conv on the float input and quantizes its output for the next layer."""
    run, result = float_stem_ptq
    calibration = read_calibration(result.calibration_path)
    assert result.metrics["float_stem"] and calibration.float_modules == ("head", "trunk.blocks.0.0")
    assert not [t for t in calibration.tensors if t.module in ("head", "trunk.blocks.0.0")]
    # every other entry is the fully quantized run's, unchanged
    quantized_stem = read_calibration(ptq[1].calibration_path)
    assert calibration.tensors == tuple(t for t in quantized_stem.tensors if t.module != "trunk.blocks.0.0")
    assert calibration.get("trunk.blocks.1.body.0", "input") is not None  # the stem's output, after ReLU6
    manifest = export_artifact(run, ExportConfig(precision="int8"))
    ops = manifest["int8"]["ort_ops"]
    assert manifest["int8"]["float_layers"] == ["head", "trunk.blocks.0.0"]
    assert ops.get("QLinearConv") == manifest["int8"]["quantized_weights"] == 48 and ops.get("Conv") == 1
    _assert_onnx_follows_the_fake_quantized_model(run, manifest["path"], folded_float)


def test_cli_int8_stem_quantizes_the_stem_like_the_python_setting(run_dir, ptq, tmp_path):
    from edge_tl.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["quantize", str(run), "--int8-stem", "--no-reconstruct"]) == 0
    calibration = read_calibration(run / "quantized/float/calibration.json")
    assert calibration.float_modules == ("head",)
    assert calibration.tensors == read_calibration(ptq[1].calibration_path).tensors  # float_stem=False


def test_percentile_ranges_clip_at_the_percentile_of_the_same_activations(narrow_ptq, calibration_inputs):
    run, result = narrow_ptq
    tensor = read_calibration(result.calibration_path).get("trunk.blocks.2.body.0", "input")
    values = calibration_inputs["trunk.blocks.2.body.0"]
    low, high = tensor.min, tensor.max
    assert (tensor.extra["observed_min"], tensor.extra["observed_max"]) == (values.min(), values.max())
    bin_width = 4 * np.abs(values).max() / 2048  # histogram resolution (halved up to twice)
    assert abs(high - np.percentile(values, 99.9)) <= bin_width
    assert abs(low - np.percentile(values, 0.1)) <= bin_width
    assert high < values.max()


def test_qat_recovers_accuracy_that_ptq_loses(qat, narrow_ptq, folded_float, tmp_path):
    run, result = qat
    metrics, ptq_metrics = result.metrics, narrow_ptq[1].metrics
    assert metrics["mode"] == "qat" and metrics["method"] == "percentile"
    # PTQ with clipped ranges visibly loses accuracy; QAT wins at least one validation image back.
    assert ptq_metrics["balanced_accuracy"] <= ptq_metrics["float_balanced_accuracy"] - 0.1
    assert metrics["balanced_accuracy"] >= ptq_metrics["balanced_accuracy"] + 0.1
    history = metrics["qat_history"]
    assert history[0]["val_balanced_accuracy"] == ptq_metrics["balanced_accuracy"]  # epoch 0 is the PTQ model
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    # The epoch was chosen on the validation images, so check unseen ones too: from its artifacts
    # alone, the QAT model follows the float model more closely than the PTQ model does.
    fresh = scan_image_folder(make_surface_dataset(tmp_path / "fresh", 8, img_size=64, seed=7,
                                                   classes=("ok", "scratch", "spot", "crack"))).records
    run_info = json.loads((run / "run.json").read_text())
    images = torch.from_numpy(load_tensor_batch(fresh, 64, run_info["mean"], run_info["std"]))
    with torch.no_grad():
        reference = torch.log_softmax(folded_float(images), dim=1)

    def divergence(run_dir) -> float:
        logits = torch.log_softmax(_simulated_logits(copy.deepcopy(folded_float), run_dir, images), dim=1)
        return float(torch.nn.functional.kl_div(logits, reference, reduction="batchmean", log_target=True))

    assert divergence(run) < 0.8 * divergence(narrow_ptq[0])


def test_qat_weights_are_saved_for_the_export(qat, folded_float):
    run, result = qat
    assert result.model_path == run / "quantized/float/model.safetensors"
    tuned = load_weights(result.model_path)
    original = folded_float.state_dict()
    assert tuned.keys() == original.keys()
    assert not torch.equal(tuned["trunk.blocks.5.body.0.weight"], original["trunk.blocks.5.body.0.weight"])
    calibration = read_calibration(result.calibration_path)
    assert calibration.model["mode"] == "qat"
    assert calibration.get("head", "weight") is None  # the head stays float, QAT tunes it as float
    for name in ("trunk.blocks.5.body.0", "trunk.blocks.17.0"):  # weight scales belong to the tuned weights
        weight = tuned[f"{name}.weight"].numpy()
        absmax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        expected = np.where(absmax > 0, absmax, 1) / 127
        np.testing.assert_allclose(calibration.get(name, "weight").scale, expected, rtol=1e-6)
    # what the export loads: the folded model with the QAT weights, and the same calibration
    model, run_info, loaded = load_quantized_model(run, "float")
    assert all(torch.equal(tensor, tuned[name]) for name, tensor in model.state_dict().items())
    assert loaded == calibration and run_info["img_size"] == 64
    assert _simulated_balanced_accuracy(model, run) == pytest.approx(result.metrics["balanced_accuracy"])


def test_a_later_ptq_run_with_few_images_warns_and_replaces_qat_weights(qat, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(qat[0], run)
    assert (run / "quantized/float/model.safetensors").exists()
    with caplog.at_level(logging.WARNING):
        result = quantize(run, QuantizeConfig(calib_images=12, batch_size=12, reconstruct=False))
    assert result.metrics["calib_images"] == 12 and len(result.metrics["calibration_files"]) == 12
    assert any("12 calibration images" in record.getMessage() for record in caplog.records)
    assert result.model_path is None and not (run / "quantized/float/model.safetensors").exists()
    assert read_calibration(result.calibration_path).model["mode"] == "ptq"
    assert json.loads((run / "quantized/float/metrics.json").read_text())["mode"] == "ptq"
    calibration_file = run / "quantized/float/calibration.json"
    calibration_file.write_text(calibration_file.read_text().replace('"scale": ', '"scale":  ', 1))
    with pytest.raises(ArtifactError, match="changed since quantize"):
        load_quantized_model(run, "float")


def test_gptq_rounding_lies_on_the_grid_and_beats_round_to_nearest():
    from edge_tl.reconstruct import gptq_round

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    inputs = torch.randn(4096, 24, generator=generator, dtype=torch.float64) @ mixing  # correlated channels
    columns = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    weights = torch.randn(16, 25, generator=generator, dtype=torch.float64)
    scales = weights[:, :-1].abs().amax(1) / 127
    rounded = gptq_round(weights, columns.T @ columns, scales)
    steps = rounded[:, :-1] / scales[:, None]
    assert torch.allclose(steps, steps.round(), atol=1e-9) and steps.abs().max() <= 127 + 1e-9
    nearest = torch.cat([torch.round(weights[:, :-1] / scales[:, None]) * scales[:, None], weights[:, -1:]], 1)
    target = columns @ weights.T
    gptq_error = (columns @ rounded.T - target).norm()
    nearest_error = (columns @ nearest.T - target).norm()
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)  # measured 0.74


def _qdq_logits(model: torch.nn.Module, calibration, images: np.ndarray) -> np.ndarray:
    from export.onnx_export import torch_to_onnx_proto
    from export.qdq import quantize_graph

    proto = torch_to_onnx_proto(model, images.shape[-1], 17, True)
    quantize_graph(proto, model, calibration)
    return ort_session(proto).run(None, {"input": images})[0]


def test_reconstruction_brings_the_int8_onnx_closer_to_float(ptq, folded_float):
    """Least squares against the float model plus GPTQ rounding, measured in ONNX Runtime."""
    from dataclasses import replace

    from edge_tl.reconstruct import reconstruct_weights

    run, result = ptq
    calibration = read_calibration(result.calibration_path)
    run_info = json.loads((run / "run.json").read_text())
    source = ClassBalancedSource(run_records(run_info, "train"), 128, 64, run_info["mean"], run_info["std"],
                                 batch_size=16)
    model = copy.deepcopy(folded_float)
    tensors = reconstruct_weights(model, calibration.tensors, iter_batches(source))
    assert [t for t in tensors if t.role != "weight"] == [t for t in calibration.tensors if t.role != "weight"]
    for tensor in (t for t in tensors if t.role == "weight"):
        weight = model.get_submodule(tensor.module).weight.detach().double()
        steps = weight.reshape(weight.shape[0], -1) / torch.tensor(tensor.scale, dtype=torch.float64)[:, None]
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127.001, tensor.module
    images, _, _ = _val_images(run)
    with torch.no_grad():
        float_logits = folded_float(images).numpy()
    plain = _qdq_logits(folded_float, calibration, images.numpy())
    rebuilt = _qdq_logits(model, replace(calibration, tensors=tuple(tensors)), images.numpy())
    plain_error, rebuilt_error = (float(np.mean((logits - float_logits) ** 2)) for logits in (plain, rebuilt))
    assert rebuilt_error < 0.5 * plain_error, (rebuilt_error, plain_error)


def test_reconstructed_ptq_is_kept_only_when_closer_to_float_and_then_exported(run_dir, ptq, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = quantize(run, QuantizeConfig(float_stem=False))  # the stem quantized, as in the ptq fixture
    summary, plain = result.metrics["reconstruction"], ptq[1].metrics["balanced_accuracy"]
    assert summary["images"] == min(512, ptq[1].metrics["calib_images"])
    assert summary["balanced_accuracy_before"] == pytest.approx(plain)
    assert summary["logit_error_before"] == pytest.approx(ptq[1].metrics["logit_error"])
    assert summary["logit_error_before"] > 0
    # kept on fidelity to the float model: mean |fake-quantized logits - float logits| on validation
    assert summary["kept"] == (summary["logit_error_after"] <= summary["logit_error_before"])
    chosen = "after" if summary["kept"] else "before"
    assert result.metrics["balanced_accuracy"] == pytest.approx(summary[f"balanced_accuracy_{chosen}"])
    assert result.metrics["logit_error"] == pytest.approx(summary[f"logit_error_{chosen}"])
    calibration = read_calibration(result.calibration_path)
    assert calibration.model["tuned_weights"] == summary["kept"] == (result.model_path is not None)
    if summary["kept"]:
        model, _, _ = load_quantized_model(run, "float")
        assert _simulated_balanced_accuracy(model, run) == pytest.approx(result.metrics["balanced_accuracy"])
        manifest = export_artifact(run, ExportConfig(precision="int8"))
        assert manifest["calibration"]["weights"] == "tuned"
