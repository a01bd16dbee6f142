"""export/ and edge_tl/fold.py: BN folding, FP32/FP16 ONNX parity and metadata, Q/DQ INT8 against a
numpy reference quantization, TensorRT cache from calibration.json, TensorRT build decisions."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from PIL import Image
from torch import nn

from calibrate.calibration_file import Calibration, CalibrationTensor
from calibrate.observe import collect_calibration, input_layers, output_layers
from calibrate.ranges import asymmetric_uint8
from calibrate.sources import ArraySource
from calibrate.tensorrt_cache import read_calibration_cache
from edge_tl.backbones import EdgeClassifier, Trunk, build_model
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_tl.fold import find_conv_bn_pairs, fold_batchnorm
from export.fp16 import export_fp16_onnx
from export.onnx_export import export_onnx
from export.onnx_metadata import ort_session, read_onnx_metadata
from export.onnx_ranges import export_tensorrt_cache, map_nodes_to_modules
from export.qdq import TARGETS, export_qdq_onnx, fused_op_counts
from export.tensorrt_build import check_qdq_for_tensorrt
from export.tensorrt_compat import check_engine_matches, check_precision, float_convolutions, plan_build

PX = 64
CLASSES = ["ok", "scratch", "spot", "crack"]
META = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "class_names": CLASSES, "ok_class": "ok", "stage": "float"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def _tiny_classifier(seed: int = 0) -> EdgeClassifier:
    """EdgeClassifier-shaped: conv-bn-relu6 stem, a residual depthwise block, a 1x1 conv, pool, head."""
    torch.manual_seed(seed)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU6(), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            return x + self.body(x)

    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
              Residual(), nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())]
    return _randomize_bn(EdgeClassifier(Trunk(blocks), nn.Linear(16, len(CLASSES))), seed)


@pytest.fixture(scope="module")
def lite0() -> EdgeClassifier:
    torch.manual_seed(0)
    return _randomize_bn(build_model("efficientnet_lite0", len(CLASSES), PX, pretrained=False), seed=1)


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, PX, PX)).astype(np.float32)


# --- BatchNorm folding ------------------------------------------------------------------------------


def test_fold_batchnorm_matches_original(lite0):
    folded = fold_batchnorm(lite0)
    x = torch.from_numpy(_images(2, 0))
    with torch.no_grad():
        assert torch.max(torch.abs(folded(x) - lite0(x))).item() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())  # the input is untouched
    convs = {name for name, m in lite0.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == {name for name, m in folded.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(find_conv_bn_pairs(lite0)) == 49
    assert find_conv_bn_pairs(folded) == []  # folding a folded model (quantize's output) changes nothing
    with torch.no_grad():
        assert torch.equal(fold_batchnorm(folded)(x), folded(x))


def test_fold_handles_bn_subclasses_and_skips_shared_outputs():
    class BatchNormAct(nn.BatchNorm2d):  # timm-style: normalisation and activation in one module
        def __init__(self, n):
            super().__init__(n)
            self.act = nn.ReLU6()

        def forward(self, x):
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return self.act(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), BatchNormAct(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn1(self.conv1(x))
            z = self.conv2(y)
            return self.bn2(z) + z  # conv2's raw output is read twice: must not be folded

    net = _randomize_bn(Net())
    folded = fold_batchnorm(net)
    assert find_conv_bn_pairs(net) == [("conv1", "bn1")]
    assert isinstance(folded.bn1, BatchNormAct) and folded.bn1.eps == 0.0 and isinstance(folded.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.max(torch.abs(folded(x) - net(x))).item() < 1e-5


# --- FP32 / FP16 ONNX -----------------------------------------------------------------------------


def test_fp32_onnx_parity_metadata_and_weights(lite0, tmp_path):
    path = tmp_path / "model.float.fp32.onnx"
    report = export_onnx(lite0, PX, path, metadata=META)
    assert report["max_abs_diff"] < 1e-4 and report["dynamic_batch"] and report["size_bytes"] == path.stat().st_size
    x = _images(3, 5)  # another batch size than the export's parity check
    with torch.no_grad():
        expected = lite0(torch.from_numpy(x)).numpy()
    got = ort_session(path).run(["logits"], {"input": x})[0]
    assert np.max(np.abs(got - expected)) < 1e-4
    metadata = read_onnx_metadata(path)
    assert metadata["mean"] == META["mean"] and metadata["std"] == META["std"]
    assert metadata["class_names"] == CLASSES and metadata["ok_class"] == "ok" and metadata["stage"] == "float"
    assert metadata["precision"] == "fp32" and metadata["input_size"] == [PX, PX] and metadata["channel_order"] == "RGB" and metadata["layout"] == "NCHW"
    assert all(isinstance(json.loads(p.value), object) for p in onnx.load(str(path)).metadata_props)
    # every Conv/Gemm of the file is found in the folded model by exact weights
    mapping = map_nodes_to_modules(onnx.load(str(path)).graph, fold_batchnorm(lite0))
    assert len(mapping) == 50 and mapping[next(iter(mapping))] == "trunk.blocks.0.0"


def test_golden_image_through_metadata(tmp_path):
    from edge_tl.data import preprocess

    model = _tiny_classifier()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, PX, path, dynamic_batch=False, metadata=META)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB")
    with torch.no_grad():  # PyTorch through the project's transform
        expected = model(torch.from_numpy(preprocess(image, PX, META["mean"], META["std"]))[None]).numpy()
    meta = read_onnx_metadata(path)  # a runtime that only has the ONNX file
    height, width = meta["input_size"]
    pixels = np.asarray(image.convert(meta["channel_order"]).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    x = ((pixels * meta["pixel_scale"] - np.float32(meta["mean"])) / np.float32(meta["std"])).transpose(2, 0, 1)[None]
    got = ort_session(path).run([meta["output_name"]], {meta["input_name"]: x.astype(np.float32)})[0]
    assert got.shape == (1, len(meta["class_names"]))
    assert np.max(np.abs(got - expected)) < 1e-4


def test_export_validates_metadata_and_opset(tmp_path):
    model = _tiny_classifier()
    with pytest.raises(ConfigError, match="class_names"):
        export_onnx(model, PX, tmp_path / "a.onnx", metadata={"mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(ConfigError, match="ok class 'good'"):
        export_onnx(model, PX, tmp_path / "a.onnx", metadata={**META, "ok_class": "good"})
    with pytest.raises(ConfigError, match="opset 9"):
        export_onnx(model, PX, tmp_path / "a.onnx", opset=9, metadata=META)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_fp16_onnx_within_1e_2(lite0, tmp_path):
    fp32 = tmp_path / "model.float.fp32.onnx"
    export_onnx(lite0, PX, fp32, metadata=META)
    report = export_fp16_onnx(fp32, tmp_path / "model.float.fp16.onnx")
    assert report["max_abs_diff_vs_fp32"] < 1e-2 and report["metadata"]["precision"] == "fp16"
    model = onnx.load(report["path"])
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == float32
    assert model.graph.output[0].type.tensor_type.elem_type == float32
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in model.graph.initializer if i.name in conv_weights} == {float16}
    x = _images(2, 7)
    with torch.no_grad():
        expected = lite0(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ort_session(report["path"]).run(None, {"input": x})[0] - expected)) < 1e-2
    assert report["size_bytes"] < 0.55 * fp32.stat().st_size


# --- Q/DQ INT8 ------------------------------------------------------------------------------------


def _quantize(x, scale, zero_point, qmin, qmax):
    return np.clip(np.round(x / scale) + zero_point, qmin, qmax)


def _conv_nchw(x, weight, bias, padding):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(x, weight.shape[2:], axis=(2, 3))  # N, C, H, W, kh, kw
    return np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True) + bias[None, :, None, None]


def test_qdq_reproduces_numpy_reference_quantization(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU6(), nn.Conv2d(6, 4, 1)).eval()
    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    coarse = CalibrationTensor.weight("0", w1)
    coarse = CalibrationTensor("0", "weight", "int8", 0, tuple(s * 1.5 for s in coarse.scale), coarse.zero_point,
                               coarse.min, coarse.max)  # scales must come from calibration.json, not the weights
    calibration = Calibration({"stage": "float", "img_size": 8}, "minmax", "", (
        CalibrationTensor.activation("0", "input", -1.5, 2.0),
        CalibrationTensor.activation("0", "output", -4.0, 4.0),
        CalibrationTensor.activation("2", "input", 0.0, 5.0),
        coarse, CalibrationTensor.weight("2", w2),
    ))
    report = export_qdq_onnx(model, calibration, 8, tmp_path / "q.onnx", metadata=META)
    assert report["ort_ops"].get("QLinearConv") == 1  # conv1 + ReLU6 + Q fused; conv2 has a float output

    x = np.random.default_rng(0).uniform(-2.0, 2.5, (2, 3, 8, 8)).astype(np.float32)
    sx, zx = calibration.get("0", "input").scale, calibration.get("0", "input").zero_point
    x_hat = (_quantize(x, sx, zx, 0, 255) - zx) * sx
    s1 = np.asarray(coarse.scale, np.float32)[:, None, None, None]
    w1_hat = _quantize(w1, s1, 0, -128, 127) * s1
    b1_hat = np.round(b1 / (np.float32(sx) * s1.ravel())) * (np.float32(sx) * s1.ravel())
    y = np.clip(_conv_nchw(x_hat, w1_hat, b1_hat, 1), 0.0, 6.0)
    sa, za = calibration.get("2", "input").scale, calibration.get("2", "input").zero_point
    a_hat = (_quantize(y, sa, za, 0, 255) - za) * sa
    s2 = np.asarray(calibration.get("2", "weight").scale, np.float32)[:, None, None, None]
    w2_hat = _quantize(w2, s2, 0, -128, 127) * s2
    b2_hat = np.round(b2 / (np.float32(sa) * s2.ravel())) * (np.float32(sa) * s2.ravel())
    want = _conv_nchw(a_hat, w2_hat, b2_hat, 0)

    got = ort_session(tmp_path / "q.onnx").run(["logits"], {"input": x})[0]
    one_step = sa * np.abs(w2_hat).reshape(4, -1).sum(axis=1)[None, :, None, None]  # a_hat off by one step
    assert np.all(np.abs(got - want) <= one_step + 1e-5)
    assert np.mean(np.abs(got - want) < 1e-4) > 0.9  # and almost everywhere exactly the reference
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    int8_weights = [v for v in stored.values() if v.dtype == np.int8 and v.ndim == 4]
    assert any(np.array_equal(v, _quantize(w1, s1, 0, -128, 127)) for v in int8_weights)


def _fake_quant(t: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (torch.clamp(torch.round(t / scale) + zero_point, 0, 255) - zero_point) * scale


@pytest.mark.parametrize("float_head", [False, True])
def test_qdq_network_equals_pytorch_fake_quant_of_calibration(tmp_path, float_head):
    """Every quantization point of the Q/DQ ONNX, simulated in PyTorch from calibration.json.

    With a float head (no calibration entry for ``head``) the pooled features and the head stay
    float: the last conv's output is quantized, the pool and the Gemm run in float.
    """
    model = _tiny_classifier()
    float_modules = ("head",) if float_head else ()
    calibration = collect_calibration(fold_batchnorm(model), ArraySource(_images(8, 2), 4), "minmax",
                                      float_modules=float_modules)
    report = export_qdq_onnx(model, calibration, PX, tmp_path / "tiny.int8.onnx", metadata=META)
    tail = ({"DequantizeLinear": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1} if float_head
            else {"QLinearGlobalAveragePool": 1, "Flatten": 1, "QGemm": 1})
    assert report["ort_ops"] == {"QuantizeLinear": 1, "QLinearConv": 4, "QLinearAdd": 1, **tail}
    assert report["float_layers"] == list(float_modules) and report["quantized_weights"] == 5 - len(float_modules)

    def params(module, role):
        entry = calibration.get(module, role)
        return entry.scale, entry.zero_point

    relu_output = asymmetric_uint8(0.0, calibration.get("trunk.blocks.2.0", "output").max)
    quantized_outputs = {  # module whose output tensor carries a Q/DQ pair -> its (scale, zero point)
        "trunk.blocks.0.2": params("trunk.blocks.1.body.0", "input"),  # stem ReLU6 (feeds conv and Add)
        "trunk.blocks.1.body.2": params("trunk.blocks.1.body.3", "input"),
        "trunk.blocks.1.body.3": params("trunk.blocks.1.body.3", "output"),  # projection, no activation
        "trunk.blocks.1": params("trunk.blocks.2.0", "input"),  # the residual Add
        "trunk.blocks.2.2": relu_output,  # ReLU before the pool: conv output range clipped at 0
    }
    if not float_head:
        quantized_outputs["trunk.pool"] = params("head", "input")
    simulated = fold_batchnorm(model)
    for name, (scale, zero_point) in quantized_outputs.items():
        simulated.get_submodule(name).register_forward_hook(
            lambda module, args, out, s=scale, z=zero_point: _fake_quant(out, s, z))
    input_scale, input_zero_point = params("trunk.blocks.0.0", "input")
    simulated.trunk.blocks[0][0].register_forward_pre_hook(
        lambda module, args: (_fake_quant(args[0], input_scale, input_zero_point),))
    with torch.no_grad():
        for name, module in simulated.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in float_modules:
                scales = np.asarray(calibration.get(name, "weight").scale, np.float32)
                weight_scale = torch.from_numpy(scales).reshape(-1, *[1] * (module.weight.ndim - 1))
                module.weight.copy_(torch.clamp(torch.round(module.weight / weight_scale), -128, 127) * weight_scale)
                bias_scale = torch.from_numpy(np.float32(params(name, "input")[0]) * scales)
                module.bias.copy_(torch.round(module.bias / bias_scale) * bias_scale)
    x = _images(16, 3)
    with torch.no_grad():
        want, float_logits = simulated(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy()
    got = ort_session(report["path"]).run(None, {"input": x})[0]
    assert np.max(np.abs(got - want)) < 1e-5
    assert np.max(np.abs(got - float_logits)) > 100 * np.max(np.abs(got - want))  # it really is quantized
    head = next(node for node in onnx.load(report["path"]).graph.node if node.op_type == "Gemm")
    stored = {init.name: numpy_helper.to_array(init) for init in onnx.load(report["path"]).graph.initializer}
    assert (head.input[1] in stored and stored[head.input[1]].dtype == np.float32) == float_head


def test_qdq_lite0_fuses_in_onnxruntime_and_tracks_fp32(lite0, tmp_path):
    folded = fold_batchnorm(lite0)
    calibration = collect_calibration(folded, ArraySource(_images(16, 11), 8), "minmax", model_info={"img_size": PX})
    fp32 = tmp_path / "model.float.fp32.onnx"
    export_onnx(lite0, PX, fp32, metadata=META)
    report = export_qdq_onnx(lite0, calibration, PX, tmp_path / "model.float.int8.onnx", metadata=META)
    ops = report["ort_ops"]
    assert ops.get("QLinearConv") == 49 and "Conv" not in ops and "FusedConv" not in ops
    assert ops.get("QLinearAdd") == 9 and ops.get("QLinearGlobalAveragePool") == 1 and ops.get("QGemm") == 1
    assert report["float_activations"] == [] and report["quantized_weights"] == 50
    assert fp32.stat().st_size / report["size_bytes"] > 3.4
    x = _images(16, 12)
    want = ort_session(fp32).run(None, {"input": x})[0]
    got = ort_session(report["path"]).run(None, {"input": x})[0]
    # a random-weight network quantizes poorly; these bounds only catch a broken rewrite
    # (exactness is tested on the small network against a PyTorch fake-quant simulation)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.8  # measured 0.96; a wrong scale gives ~0
    assert read_onnx_metadata(report["path"])["precision"] == "int8"

    trt_report = export_qdq_onnx(lite0, calibration, PX, tmp_path / "trt.int8.onnx", target="tensorrt", metadata=META)
    assert trt_report["activation_dtype"] == "int8"
    assert check_qdq_for_tensorrt(onnx.load(trt_report["path"])) == trt_report["quantized_activations"]
    with pytest.raises(ConfigError, match="symmetric int8"):
        check_qdq_for_tensorrt(onnx.load(report["path"]))
    with pytest.raises(ArtifactError, match="have 32 channels, the model has 8; recalibrate"):
        export_qdq_onnx(_tiny_classifier(), calibration, PX, tmp_path / "wrong.onnx", metadata=META)
    with pytest.raises(ArtifactError, match="match no Conv2d/Linear weight"):
        map_nodes_to_modules(onnx.load(str(fp32)).graph, fold_batchnorm(_tiny_classifier()))
    assert not (tmp_path / "wrong.onnx").exists()


def test_float_head_keeps_the_lite0_trunk_fused_and_the_gemm_float(lite0, tmp_path):
    """A module without calibration entries (the head) stays float in both Q/DQ flavours."""
    folded = fold_batchnorm(lite0)
    calibration = collect_calibration(folded, ArraySource(_images(16, 11), 8), "minmax", model_info={"img_size": PX},
                                      float_modules=output_layers(folded))
    assert calibration.float_modules == ("head",) and calibration.get("head", "weight") is None
    x = _images(16, 12)
    with torch.no_grad():
        want = lite0(torch.from_numpy(x)).numpy()
    reports = {}
    for target in TARGETS:
        reports[target] = report = export_qdq_onnx(lite0, calibration, PX, tmp_path / f"{target}.int8.onnx",
                                                    target=target, metadata=META)
        assert report["float_layers"] == ["head"] and report["quantized_weights"] == 49
        graph = onnx.load(report["path"]).graph
        producer = {name: node for node in graph.node for name in node.output}
        stored = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
        assert stored[gemm.input[1]].dtype == np.float32 and stored[gemm.input[2]].dtype == np.float32
        flatten = producer[gemm.input[0]]
        pool = producer[flatten.input[0]]
        assert (flatten.op_type, pool.op_type, producer[pool.input[0]].op_type) == (
            "Flatten", "GlobalAveragePool", "DequantizeLinear")  # last conv quantized, pooled features float
        assert report["float_activations"] == [pool.output[0]]
        got = ort_session(report["path"]).run(None, {"input": x})[0]
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.8  # the bound of the fully quantized export
    ops = reports["onnxruntime"]["ort_ops"]
    assert ops.get("QLinearConv") == 49 and "Conv" not in ops and "FusedConv" not in ops and ops.get("QLinearAdd") == 9
    assert ops.get("Gemm") == 1 and "QGemm" not in ops and "QLinearGlobalAveragePool" not in ops
    trt = reports["tensorrt"]
    assert trt["activation_dtype"] == "int8" and check_qdq_for_tensorrt(onnx.load(trt["path"])) == trt["quantized_activations"]


def test_calibration_for_other_modules_is_refused(tmp_path):
    """Absent modules stay float, so a calibration naming other modules must not pass as an all-float "INT8" file."""
    model = _tiny_classifier()
    calibration = collect_calibration(fold_batchnorm(model), ArraySource(_images(4, 1), 2), "minmax")
    renamed = tuple(CalibrationTensor(t.module.replace("trunk.blocks.2.0", "trunk.blocks.3.0"), t.role, t.dtype, t.axis,
                                      t.scale, t.zero_point, t.min, t.max) for t in calibration.tensors)
    with pytest.raises(ArtifactError, match=r"names modules \['trunk.blocks.3.0'\] the model has no Conv/Gemm for"):
        export_qdq_onnx(model, Calibration({}, "minmax", "", renamed), PX, tmp_path / "a.onnx", metadata=META)
    with pytest.raises(ArtifactError, match="quantizes no layer"):
        export_qdq_onnx(model, Calibration({}, "minmax", "", ()), PX, tmp_path / "b.onnx", metadata=META)
    assert not list(tmp_path.iterdir())


def test_float_conv_between_quantized_activations_is_refused_for_onnxruntime(tmp_path):
    """ONNX Runtime miscomputes a float-weight Conv fed by a quantized tensor: the export refuses to write one."""
    model = _tiny_classifier()
    calibration = collect_calibration(fold_batchnorm(model), ArraySource(_images(4, 1), 2), "minmax")
    convs = [t.module for t in calibration.tensors if t.role == "weight" and t.module != "head"]
    dropped = tuple(t for t in calibration.tensors if not (t.module == convs[-1] and t.role == "weight"))
    partial = Calibration({}, "minmax", "", dropped)
    with pytest.raises(ArtifactError, match=f"quantizes the input of {convs[-1]} but not its weight"):
        export_qdq_onnx(model, partial, PX, tmp_path / "a.onnx", metadata=META)
    assert not list(tmp_path.iterdir())
    report = export_qdq_onnx(model, partial, PX, tmp_path / "b.onnx", target="tensorrt", metadata=META)
    assert convs[-1] in report["float_layers"]


def test_float_stem_may_run_fp32_in_a_tensorrt_int8_engine(tmp_path):
    """A Q/DQ file whose stem is float (no calibration entry): its Conv keeps float weights, and the
    engine check lets exactly that layer run FP32 (TensorRT 11 networks are strongly typed)."""
    model = _tiny_classifier()
    calibration = collect_calibration(fold_batchnorm(model), ArraySource(_images(4, 1), 2), "minmax")
    float_stem = Calibration({}, "minmax", "", tuple(t for t in calibration.tensors if t.module != "trunk.blocks.0.0"))
    report = export_qdq_onnx(model, float_stem, PX, tmp_path / "trt.int8.onnx", target="tensorrt", metadata=META)
    assert "trunk.blocks.0.0" in report["float_layers"]
    qdq = onnx.load(str(tmp_path / "trt.int8.onnx"))
    convs = [node.name for node in qdq.graph.node if node.op_type == "Conv"]
    assert float_convolutions(qdq) == (convs[0],)  # the stem, first in graph order; the rest read DequantizeLinear
    int8 = "Thirty-two wide channel vectorized row major Int8 format"
    engine = {"Layers": [
        {"Name": f"{convs[0]} + /trunk/blocks/blocks.0/blocks.0.2/Clip", "LayerType": "CaskConvolution",
         "ParameterType": "Convolution", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
        *({"Name": name, "LayerType": "CaskConvolution", "ParameterType": "Convolution",
           "Inputs": [{"Format/Datatype": int8}]} for name in convs[1:])]}
    assert check_precision(engine, "int8", float_convolutions(qdq)) == {"fp32": 1, "int8": len(convs) - 1}
    with pytest.raises(ArtifactError, match="dropped the requested int8"):
        check_precision(engine, "int8")


def test_tensorrt_cache_from_calibration(tmp_path):
    model = _tiny_classifier()
    fp32 = tmp_path / "tiny.onnx"
    export_onnx(model, PX, fp32, metadata=META)
    calibration = collect_calibration(fold_batchnorm(model), ArraySource(_images(4, 1), 2), "minmax")
    scales = export_tensorrt_cache(fp32, model, calibration, tmp_path / "tiny.calib", "8.6.1")
    cache = read_calibration_cache(tmp_path / "tiny.calib")
    assert cache.scales == scales and cache.version_tag == 8601
    stem = calibration.get("trunk.blocks.0.0", "input")
    assert scales["input"] == float(np.float32(max(abs(stem.min), abs(stem.max)) / 127))
    graph = onnx.load(str(fp32)).graph
    conv_outputs = [n.output[0] for n in graph.node if n.op_type == "Conv"]
    assert set(conv_outputs) <= set(scales)  # every conv output tensor of the ONNX has a scale
    clip_outputs = [n.output[0] for n in graph.node if n.op_type == "Clip"]
    assert all(scales[name] <= float(np.float32(6 / 127)) for name in clip_outputs)  # ReLU6 caps the range


def test_fused_op_counts_of_fp32_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_onnx(_tiny_classifier(), PX, path, metadata=META)
    ops = fused_op_counts(path)
    assert "QLinearConv" not in ops and sum(ops.get(k, 0) for k in ("Conv", "FusedConv")) == 4


# --- TensorRT build decisions (pure) -----------------------------------------------------------------


def test_tensorrt_build_plans():
    plan = plan_build("8.5.2", "fp16")
    assert plan.builder_flags == ("FP16", "PREFER_PRECISION_CONSTRAINTS") and plan.explicit_batch_flag
    assert plan.onnx_kind == "fp32"
    plan = plan_build("8.6.1", "int8", "qdq", dla_core=0)  # DLA runs implicit INT8: the FP32 file and its cache
    assert plan.builder_flags == ("INT8", "FP16", "GPU_FALLBACK") and plan.onnx_kind == "fp32"
    assert plan.calibration_cache and plan.dla_core == 0
    plan = plan_build("10.3.0", "int8", "cache")
    assert plan.calibration_cache and plan.onnx_kind == "fp32" and not plan.explicit_batch_flag
    plan = plan_build("11.0.0", "fp16")
    assert plan.strongly_typed and plan.builder_flags == () and plan.onnx_kind == "fp16"
    assert plan_build("11.1", "int8").onnx_kind == "qdq"
    with pytest.raises(ConfigError, match="no implicit INT8"):
        plan_build("11.0.0", "int8", "cache")
    with pytest.raises(ConfigError, match="DLA"):
        plan_build("11.0.0", "fp16", dla_core=0)
    for version in ("7.1.3", "8.4.3", "9.0.0", "12.0"):
        with pytest.raises(BackendUnavailableError, match=version):
            plan_build(version, "fp16")
    with pytest.raises(ConfigError, match="fp32"):
        plan_build("10.3.0", "fp32")


def _inspector(*formats: str) -> dict:
    layers = [{"Name": f"conv{i}", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
               "Inputs": [{"Format/Datatype": fmt}]} for i, fmt in enumerate(formats)]
    return {"Layers": [{"Name": "reformat", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]}, *layers]}


def test_engine_precision_check():
    int8 = "Thirty-two wide channel vectorized row major Int8 format"
    half = "Channel major FP16 format where channel % 8 == 0"
    assert check_precision(json.dumps(_inspector(int8, int8, half)), "int8") == {"int8": 2, "fp16": 1}
    assert check_precision(_inspector(half, half), "fp16") == {"fp16": 2}
    with pytest.raises(ArtifactError, match="dropped the requested int8"):
        check_precision(_inspector(half, half), "int8")
    with pytest.raises(ArtifactError, match="FP32: conv1"):
        check_precision(_inspector(half, "Row major linear FP32"), "fp16")
    with pytest.raises(ArtifactError, match="DETAILED"):
        check_precision({"Layers": ["conv0", "conv1"]}, "fp16")
    manifest = {"tensorrt_version": "8.6.2", "compute_capability": "8.7"}
    check_engine_matches(manifest, "8.6.2", "8.7")
    with pytest.raises(ArtifactError, match="TensorRT 8.6.2"):
        check_engine_matches(manifest, "10.3.0", "8.7")
    with pytest.raises(ArtifactError, match="compute capability 8.7"):
        check_engine_matches(manifest, "8.6.2", "7.2")


def test_build_engine_needs_tensorrt(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine (engines build on the device)")
    pytest.importorskip("pycuda", reason="pycuda is not installed on this machine")
    from export.tensorrt_build import build_engine

    path = tmp_path / "tiny.onnx"
    export_onnx(_tiny_classifier(), PX, path, metadata=META)
    manifest = build_engine(path, tmp_path / "tiny.fp16.engine", "fp16", PX)
    assert manifest["precision"] == "fp16" and manifest["convolution_input_types"].get("fp32", 0) == 0


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"])
def test_other_backbones_export_int8_with_a_float_stem_and_head(name, tmp_path):
    """Hardswish, squeeze-excitation and SiLU trunks: with the stem and head left out of the
    calibration (edge-tl quantize's default), ONNX Runtime runs one float Conv and fuses every
    other convolution into QLinearConv."""
    torch.manual_seed(0)
    model = build_model(name, 3, PX, pretrained=False).eval()
    folded = fold_batchnorm(model)
    images = torch.randn(8, 3, PX, PX)
    calibration = collect_calibration(folded, ArraySource(images.numpy(), 4), "minmax",
                                      float_modules=(*input_layers(folded), *output_layers(folded)))
    report = export_qdq_onnx(model, calibration, PX, tmp_path / "m.onnx", metadata=META)
    assert report["float_layers"] == ["head", "trunk.blocks.0.0"]
    assert report["ort_ops"]["Conv"] == 1 and report["ort_ops"]["QLinearConv"] == report["quantized_weights"]
    assert ort_session(str(tmp_path / "m.onnx")).run(None, {"input": images.numpy()})[0].shape == (8, 3)
