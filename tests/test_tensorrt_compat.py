"""The pure TensorRT decisions: versions, build plans, the inspector check, the ONNX-for-plan check."""
from __future__ import annotations

import onnx
import pytest

from edge_tl.errors import ArtifactError, ConfigError
from export.tensorrt_build import check_onnx_for_plan
from export.tensorrt_compat import (
    check_precision, float_convolutions, fp32_convolutions, layer_name_parts, max_onnx_opset, parse_version,
    plan_build,
)
from tensorrt_api_fake import FP32, HALF, INT8, layer_json, tiny_onnx


def test_versions_parse_with_build_numbers_and_early_access_tags():
    assert parse_version("10.0.0b6") == (10, 0, 0)
    assert parse_version("11.4.0.106") == (11, 4, 0) and parse_version("8.6.1.6") == (8, 6, 1)
    assert parse_version("10.7.0.post1") == (10, 7, 0) and parse_version("10") == (10, 0, 0)
    with pytest.raises(ConfigError, match="'ten' is not MAJOR.MINOR"):
        parse_version("ten")
    assert max_onnx_opset("8.5.2") == 17 and max_onnx_opset("8.6.1") is None and max_onnx_opset("10.0.0b6") is None


def test_fp16_before_11_prefers_per_layer_precision():
    plan = plan_build("10.3.0", "fp16")
    assert plan.builder_flags == ("FP16", "PREFER_PRECISION_CONSTRAINTS") and plan.layer_precision == "fp16"
    assert plan.onnx_kind == "fp32" and plan.int8_source is None
    assert plan_build("11.4.0", "fp16").layer_precision is None and plan_build("11.4.0", "fp16").builder_flags == ()


def test_int8_on_dla_before_11_builds_from_the_cache():
    for version in ("8.5.2", "8.6.1", "10.3.0"):
        plan = plan_build(version, "int8", "qdq", dla_core=1)
        assert (plan.onnx_kind, plan.int8_source, plan.calibration_cache) == ("fp32", "cache", True)
        assert plan.builder_flags == ("INT8", "FP16", "GPU_FALLBACK") and plan.dla_core == 1
    plan = plan_build("10.3.0", "int8", "qdq")  # off DLA, the Q/DQ file stays the source
    assert (plan.onnx_kind, plan.int8_source, plan.calibration_cache) == ("qdq", "qdq", False)


def test_dla_on_11_needs_11_4_1():
    for version in ("11.0.0", "11.3.0", "11.4.0"):
        with pytest.raises(ConfigError, match=f"TensorRT {version} has no DLA support.*11.4.1.*drop --dla-core"):
            plan_build(version, "fp16", dla_core=0)
    plan = plan_build("11.4.1", "int8", dla_core=0)
    assert plan.strongly_typed and plan.onnx_kind == "qdq" and plan.builder_flags == ("GPU_FALLBACK",)
    assert plan_build("11.5.0", "fp16", dla_core=1).dla_core == 1


def test_errors_name_only_options_that_exist():
    with pytest.raises(ConfigError) as caught:
        plan_build("11.0.0", "int8", "cache")
    assert "--int8-source" not in str(caught.value) and "without --calibration-cache" in str(caught.value)
    with pytest.raises(ConfigError, match="--dla-core -1 must be an integer >= 0"):
        plan_build("10.3.0", "fp16", dla_core=-1)


def test_dla_subgraph_passes_and_only_gpu_convolutions_are_checked():
    dla = {"Name": "{ForeignNode[/stem/Conv.../head/Gemm]}", "LayerType": "DLA", "Inputs": [{"Format/Datatype": HALF}]}
    assert check_precision({"Layers": [dla]}, "int8") == {"dla": 1}
    assert check_precision({"Layers": [dla, layer_json("/head/Conv", INT8)]}, "int8") == {"int8": 1, "dla": 1}
    with pytest.raises(ArtifactError, match="FP32: /head/Conv"):  # a GPU fallback convolution is still checked
        check_precision({"Layers": [dla, layer_json("/head/Conv", FP32)]}, "fp16")
    with pytest.raises(ArtifactError, match="no convolution or DLA layers"):
        check_precision({"Layers": [{"Name": "reformat", "LayerType": "Reformat"}]}, "fp16")


def test_float_layers_match_fused_names_exactly():
    assert layer_name_parts("/stem/Conv + /stem/Relu") == ("/stem/Conv", "/stem/Relu")
    engine = {"Layers": [layer_json("/stem/Conv + /stem/Relu", FP32), layer_json("/stem/Conv_1", FP32), layer_json("/b/Conv", INT8)]}
    # "/stem/Conv" is a substring of "/stem/Conv_1" but not that layer: only the fused stem may be FP32
    assert fp32_convolutions(engine, ("/stem/Conv",)) == ["/stem/Conv_1"]
    with pytest.raises(ArtifactError, match="FP32: /stem/Conv_1"):
        check_precision(engine, "int8", ("/stem/Conv",))


def test_float_gemm_head_is_a_float_layer(tmp_path):
    qdq = onnx.load(str(tiny_onnx(tmp_path / "m.onnx", "qdq")))
    assert float_convolutions(qdq) == ("/stem/Conv", "/head/Gemm")
    engine = {"Layers": [layer_json("/stem/Conv + /stem/Relu", FP32), layer_json("/block/Conv", INT8), layer_json("/head/Gemm", FP32)]}
    assert check_precision(engine, "int8", float_convolutions(qdq), qdq=True) == {"fp32": 2, "int8": 1}


def test_fp16_reports_fp32_and_qdq_int8_fails_on_fp16():
    engine = {"Layers": [layer_json("/a/Conv", HALF), layer_json("/b/Conv", FP32)]}
    assert check_precision(engine, "fp16", fp32_allowed=True) == {"fp16": 1, "fp32": 1}
    assert fp32_convolutions(engine) == ["/b/Conv"]
    with pytest.raises(ArtifactError, match="dropped the requested fp16"):  # nothing FP16 at all still fails
        check_precision({"Layers": [layer_json("/a/Conv", FP32)]}, "fp16", fp32_allowed=True)
    engine = {"Layers": [layer_json("/a/Conv", INT8), layer_json("/b/Conv", HALF)]}
    assert check_precision(engine, "int8") == {"int8": 1, "fp16": 1}  # implicit INT8 may pick FP16
    with pytest.raises(ArtifactError, match=r"FP16: /b/Conv \(Q/DQ convolutions must run INT8\)"):
        check_precision(engine, "int8", qdq=True)


def test_inspector_with_a_split_datatype_field():
    layer = {"Name": "/a/Conv", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
             "Inputs": [{"DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major"}]}
    assert check_precision({"Layers": [layer]}, "int8", qdq=True) == {"int8": 1}


def test_onnx_must_fit_the_plan(tmp_path):
    fp32 = onnx.load(str(tiny_onnx(tmp_path / "fp32.onnx", "fp32")))
    qdq = onnx.load(str(tiny_onnx(tmp_path / "qdq.onnx", "qdq")))
    fp16 = onnx.load(str(tiny_onnx(tmp_path / "fp16.onnx", "fp16")))
    static = onnx.load(str(tiny_onnx(tmp_path / "static.onnx", "fp32", batch=1)))
    opset18 = onnx.load(str(tiny_onnx(tmp_path / "o18.onnx", "fp32", opset=18)))
    assert check_onnx_for_plan(qdq, "q.onnx", plan_build("10.3.0", "int8"), "10.3.0", 32, 8) == ("/stem/Conv", "/head/Gemm")
    assert check_onnx_for_plan(fp16, "h.onnx", plan_build("11.4.0", "fp16"), "11.4.0", 32, 8) == ()
    assert check_onnx_for_plan(static, "s.onnx", plan_build("10.3.0", "fp16"), "10.3.0", 32, 1) == ()
    cases = [
        (static, plan_build("10.3.0", "fp16"), "10.3.0", 32, 8, "s.onnx has a fixed batch of 1; --max-batch 8 needs a dynamic"),
        (opset18, plan_build("8.5.2", "fp16"), "8.5.2", 32, 1, "opset 18; TensorRT 8.5.2 reads opset <= 17.*--opset 17"),
        (qdq, plan_build("8.6.1", "int8", dla_core=0), "8.6.1", 32, 1, "Q/DQ ONNX; INT8 on DLA with TensorRT 8.6.1 builds "
                                                                        "from the FP32 ONNX.*--calibration-cache FILE"),
        (qdq, plan_build("10.3.0", "fp16"), "10.3.0", 32, 1, "Q/DQ \\(INT8\\) ONNX, but this is a fp16 build"),
        (fp32, plan_build("11.4.0", "fp16"), "11.4.0", 32, 1, "FP32 ONNX; TensorRT 11.4.0 builds FP16 from an FP16 ONNX"),
        (fp32, plan_build("10.3.0", "int8"), "10.3.0", 32, 1, "no QuantizeLinear nodes"),
        (fp32, plan_build("10.3.0", "fp16"), "10.3.0", 64, 1, "takes 32x32 px images, not 64 px"),
        (fp32, plan_build("10.3.0", "fp16"), "10.3.0", 32, 0, "--max-batch 0 must be an integer >= 1"),
    ]
    for model, plan, version, size, batch, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_onnx_for_plan(model, "s.onnx" if model is static else "m.onnx", plan, version, size, batch)
