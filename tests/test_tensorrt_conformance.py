"""edge-tl's TensorRT calls against each version's real API names, without TensorRT or a GPU.

The name lists (tests/tensorrt_api, from the bindings wheels by scripts/tensorrt_api_names.py)
back strict stand-ins (tests/tensorrt_api_fake.py): any module attribute, enum member, method or
property edge-tl touches that a version lacks fails the test, naming the version and the name.
Driven: network creation, every build plan's config, the whole build_engine path (profiles,
per-layer precision, calibrator, timing cache, DLA core, inspector), and the runner's set-up
and inference path.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from calibrate.sources import ArraySource
from edge_tl.artifacts import atomic_write_json, read_json
from edge_tl.errors import ArtifactError, ConfigError
from export.tensorrt_build import build_engine, manifest_path
from export.tensorrt_compat import (
    BuildPlan, configure, create_network, engine_information, parse_version, plan_build, prefer_layer_precision,
)
from tensorrt_api_fake import (
    API_DIR, FP32, HALF, VERSIONS, EnumValue, MissingName, api_names, inspector_for, install, layer_json, tiny_onnx,
)

PX = 32
BEFORE_11 = [v for v in VERSIONS if parse_version(v)[0] < 11]
def _plans(version: str) -> list[tuple[str, str, int | None]]:
    """Every (precision, int8_source, dla_core) the version builds; DLA on 11 needs 11.4.1+."""
    if parse_version(version)[0] >= 11:
        return [("fp16", "qdq", None), ("int8", "qdq", None), ("fp16", "qdq", 0), ("int8", "qdq", 1)]
    return [("fp16", "qdq", None), ("int8", "qdq", None), ("int8", "cache", None), ("fp16", "qdq", 0),
            ("int8", "qdq", 0)]


def _plan_version(version: str, dla_core: int | None) -> str:
    return "11.4.1" if dla_core is not None and parse_version(version)[0] >= 11 else version


# --- the lists themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_name_lists_are_sorted_and_say_where_they_come_from(version):
    names_of = api_names(version)
    wheel = re.search(r"from (tensorrt_(?:cu12_)?bindings-[\w.\-]+\.whl)$", names_of.header[0])
    digest = re.fullmatch(r"# sha256 ([0-9a-f]{64})", names_of.header[1])
    assert wheel and version in wheel.group(1) and digest
    lines = (API_DIR / f"tensorrt-{version}.txt").read_text(encoding="ascii").splitlines()
    names = [line for line in lines if not line.startswith("#")]
    assert names == sorted(set(names)) and all(name.isidentifier() for name in names)
    for name in ("Builder", "create_network", "set_input_shape", "execute_async_v3", "__version__", "nptype"):
        assert names_of.has(name), name


def test_the_lists_differ_where_the_api_does():
    has = {version: api_names(version).has for version in VERSIONS}
    for version in VERSIONS:
        major = parse_version(version)[0]
        assert has[version]("EXPLICIT_BATCH") == (major < 11)
        assert has[version]("IInt8EntropyCalibrator2") == (major < 11)
        assert has[version]("PREFER_PRECISION_CONSTRAINTS") == (major < 11)
        assert has[version]("STRONGLY_TYPED") == (major >= 10)  # 8.6 predates strongly typed networks
        assert has[version]("get_tensor_profile_shape") and has[version]("DLA_core")


def test_the_stand_in_refuses_what_a_version_lacks(monkeypatch):
    trt, _ = install(monkeypatch, "11.4.0.106")
    with pytest.raises(MissingName, match=r"TensorRT 11\.4\.0\.106 has no NetworkDefinitionCreationFlag\.EXPLICIT_BATCH"):
        trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    with pytest.raises(MissingName, match="BuilderFlag.FP16"):
        trt.BuilderFlag.FP16
    with pytest.raises(MissingName, match="tensorrt.IInt8EntropyCalibrator2"):
        trt.IInt8EntropyCalibrator2
    # code that asked for explicit batch unconditionally would fail on 11.4
    plan_8x = BuildPlan("fp32", False, (), False, True, None, "fp16")
    with pytest.raises(MissingName, match="EXPLICIT_BATCH"):
        create_network(trt.Builder(None), plan_8x)
    config = trt.Builder(None).create_builder_config()
    with pytest.raises(MissingName, match="int8_calibrator"):
        config.int8_calibrator = object()
    trt86, _ = install(monkeypatch, "8.6.1")
    with pytest.raises(MissingName, match="8.6.1 has no NetworkDefinitionCreationFlag.STRONGLY_TYPED"):
        trt86.NetworkDefinitionCreationFlag.STRONGLY_TYPED


# --- network creation and configuration --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_create_network_sets_explicit_batch_only_on_8x(monkeypatch, version):
    trt, _ = install(monkeypatch, version)
    create_network(trt.Builder(None), plan_build(version, "fp16"))
    expected = 1 << int(EnumValue("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH")) if version.startswith("8.") else 0
    assert trt.network_flags == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_every_plan_configures_with_names_the_version_has(monkeypatch, version):
    for precision, source, dla_core in _plans(version):
        trt, _ = install(monkeypatch, version)
        plan = plan_build(_plan_version(version, dla_core), precision, source, dla_core)
        builder = trt.Builder(None)
        network = create_network(builder, plan)
        config = builder.create_builder_config()
        configure(config, plan, 256 << 20)
        asked = prefer_layer_precision(network, plan)
        assert trt.flags == list(plan.builder_flags)
        assert ("pool", EnumValue("MemoryPoolType", "WORKSPACE"), 256 << 20) in trt.events
        assert config.profiling_verbosity == EnumValue("ProfilingVerbosity", "DETAILED")
        if dla_core is not None:
            assert config.default_device_type == EnumValue("DeviceType", "DLA") and config.DLA_core == dla_core
        # FP16 before 11: every convolution and the Gemm head asked for HALF; never on 11 (no layer precision)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        halves = [layer.name for layer in layers if layer._precision == EnumValue("DataType", "HALF")]
        assert asked == len(halves) == (3 if plan.layer_precision == "fp16" else 0)


# --- the whole build ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_build_engine_runs_every_plan_on_the_version_names(monkeypatch, tmp_path, version):
    for precision, source, dla_core in _plans(version):
        trt_version = _plan_version(version, dla_core)
        plan = plan_build(trt_version, precision, source, dla_core)
        trt, cuda = install(monkeypatch, version, __version__=trt_version, inspector=inspector_for(plan),
                            profile_shape=((1, 3, PX, PX), (8, 3, PX, PX), (8, 3, PX, PX)))
        onnx_path = tiny_onnx(tmp_path / f"{plan.onnx_kind}.onnx", plan.onnx_kind)
        cache = tmp_path / "model.int8.calib"
        cache.write_text("TRT-8601-EntropyCalibration2\ninput: 3c010204\n")
        engine = tmp_path / f"{precision}-{source}-{dla_core}.engine"
        manifest = build_engine(onnx_path, engine, precision, PX, int8_source=source,
                                calibration_cache=cache if plan.calibration_cache else None, dla_core=dla_core,
                                max_batch=8)
        assert engine.read_bytes() == b"serialized engine" and read_json(manifest_path(engine)) == manifest
        assert manifest["tensorrt_version"] == trt_version and manifest["settings"]["int8_source"] == plan.int8_source
        assert trt.profiles[0] == ("input", (1, 3, PX, PX), (8, 3, PX, PX), (8, 3, PX, PX))
        if dla_core is not None:  # the runtime's core is set before the engine is deserialized
            assert manifest["convolution_input_types"] == {"dla": 1}
            set_core = trt.events.index(("set", "FakeRuntime", "DLA_core", dla_core))
            assert set_core < trt.events.index(("deserialize",))
        if plan.calibration_cache:  # the cache is read, no images are fed, buffers stayed in the primary context
            assert trt.calibration_cache_read == cache.read_bytes() and trt.calibration_batches == 0
            assert ("calibration_profile",) in trt.events and not cuda.stack


@pytest.mark.parametrize("version", BEFORE_11)
def test_calibrating_on_images_uses_the_primary_context(monkeypatch, tmp_path, version):
    from calibrate.tensorrt_calibrator import make_entropy_calibrator

    trt, cuda = install(monkeypatch, version)
    images = np.random.default_rng(0).normal(size=(5, 3, PX, PX)).astype(np.float32)
    calibrator = make_entropy_calibrator(ArraySource(images, 2), 2, tmp_path / "new.calib")
    overridden = [name for name in vars(type(calibrator)) if not name.startswith("_") and name != "release"]
    assert sorted(overridden) == ["get_batch", "get_batch_size", "read_calibration_cache", "write_calibration_cache"]
    assert all(api_names(version).has(name) for name in overridden)  # TensorRT calls them by these names
    assert calibrator.read_calibration_cache() is None
    pointers = [calibrator.get_batch(["input"]), calibrator.get_batch(["input"]), calibrator.get_batch(["input"])]
    assert pointers[0] == pointers[1] == [int(cuda.allocations[0])] and pointers[2] is None  # the 1-image tail is skipped
    assert cuda.allocations[0].context is cuda.primary and cuda.copies == 2 and not cuda.stack
    calibrator.write_calibration_cache(b"TRT-8601-EntropyCalibration2\n")
    assert (tmp_path / "new.calib").read_bytes() == b"TRT-8601-EntropyCalibration2\n"
    calibrator.release()
    assert cuda.allocations[0].freed and not cuda.stack


def test_calibrator_is_refused_on_tensorrt_11(monkeypatch):
    from calibrate.tensorrt_calibrator import make_entropy_calibrator

    install(monkeypatch, "11.4.0.106")
    with pytest.raises(ConfigError, match=r"TensorRT 11\.4\.0\.106 has no implicit INT8 calibration"):
        make_entropy_calibrator(ArraySource(np.zeros((2, 3, PX, PX), np.float32), 2), 2)


@pytest.mark.parametrize("version", BEFORE_11)
def test_fp16_reports_a_convolution_left_fp32_and_int8_qdq_fails_loudly(monkeypatch, tmp_path, version, caplog):
    layers = {"Layers": [layer_json("/stem/Conv + /stem/Relu", HALF), layer_json("/block/Conv", FP32)]}
    install(monkeypatch, version, inspector=layers)
    onnx_path = tiny_onnx(tmp_path / "fp32.onnx", "fp32")
    manifest = build_engine(onnx_path, tmp_path / "a.engine", "fp16", PX)
    assert manifest["fp32_convolutions"] == ["/block/Conv"] and manifest["convolution_input_types"] == {"fp16": 1, "fp32": 1}
    assert "1 convolutions of fp32.onnx stay FP32" in caplog.text
    layers = {"Layers": [layer_json("/stem/Conv + /stem/Relu", FP32), layer_json("/block/Conv", HALF), layer_json("/head/Gemm", FP32)]}
    install(monkeypatch, version, inspector=layers)
    with pytest.raises(ArtifactError, match=r"dropped the requested int8.*; FP16: /block/Conv \(Q/DQ convolutions must run INT8\)"):
        build_engine(tiny_onnx(tmp_path / "qdq.onnx", "qdq"), tmp_path / "b.engine", "int8", PX)
    assert not (tmp_path / "b.engine").exists()


@pytest.mark.parametrize("version", VERSIONS)
def test_timing_cache_is_written_back_only_when_accepted(monkeypatch, tmp_path, version, caplog):
    inspector = {"Layers": [layer_json("/stem/Conv", HALF), layer_json("/block/Conv", HALF)]}
    kind = "fp16" if parse_version(version)[0] >= 11 else "fp32"
    onnx_path = tiny_onnx(tmp_path / "m.onnx", kind)
    trt, _ = install(monkeypatch, version, inspector=inspector)
    fresh = tmp_path / "fresh.cache"
    manifest = build_engine(onnx_path, tmp_path / "a.engine", "fp16", PX, timing_cache=fresh)
    assert fresh.read_bytes() == b"timing-cache:" and manifest["settings"]["timing_cache_used"]
    assert ("timing_cache", b"", False) in trt.events
    foreign = tmp_path / "foreign.cache"
    foreign.write_bytes(b"from another GPU")
    install(monkeypatch, version, inspector=inspector)
    manifest = build_engine(onnx_path, tmp_path / "b.engine", "fp16", PX, timing_cache=foreign)
    assert foreign.read_bytes() == b"from another GPU" and not manifest["settings"]["timing_cache_used"]
    assert "refused the timing cache" in caplog.text


# --- the runner ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_runner_sets_up_runs_and_checks_the_batch(monkeypatch, tmp_path, version):
    from edge_tl.runners.tensorrt_runner import TensorRTRunner

    trt, cuda = install(monkeypatch, version, profile_shape=((1, 3, PX, PX), (8, 3, PX, PX), (8, 3, PX, PX)))
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine")
    atomic_write_json(manifest_path(engine), {"tensorrt_version": version, "compute_capability": "8.7", "dla_core": 1})
    with TensorRTRunner(engine) as runner:
        assert cuda.stack == [cuda.primary]
        spec = runner.input_specs()["input"]
        assert spec.shape == (None, 3, PX, PX) and spec.dtype == np.float32
        outputs = runner.infer({"input": np.zeros((8, 3, PX, PX), np.float32)})
        assert outputs["logits"].shape == (8, 4) and runner.last_device_ms == 0.25
        assert ("execute", 7) in trt.events
        with pytest.raises(ConfigError, match=r"input 'input' of shape \(9, 3, 32, 32\) is outside the engine's "
                                              r"profile \(batch 1 to 8\)"):
            runner.infer({"input": np.zeros((9, 3, PX, PX), np.float32)})
    assert trt.events.index(("set", "FakeRuntime", "DLA_core", 1)) < trt.events.index(("deserialize",))
    assert not cuda.stack and all(allocation.freed for allocation in cuda.allocations)


def test_runner_refuses_a_dla_core_the_device_lacks(monkeypatch, tmp_path):
    from edge_tl.runners.tensorrt_runner import TensorRTRunner

    install(monkeypatch, "10.3.0", dla_cores=0)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine")
    atomic_write_json(manifest_path(engine), {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "dla_core": 0})
    with pytest.raises(ArtifactError, match="runs on DLA core 0; this device has 0 DLA cores"):
        TensorRTRunner(engine).activate()


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_information_reads_the_context_formats(monkeypatch, version):
    trt, _ = install(monkeypatch, version, inspector={"Layers": []})
    engine = trt.Runtime(None).deserialize_cuda_engine(b"")
    context = engine.create_execution_context()
    assert engine_information(engine, context) == '{"Layers": []}'
    assert ("set", "FakeInspector", "execution_context", context) in trt.events


def test_name_list_headers_match_the_wheel_hash_format():
    for version in VERSIONS:
        digest = api_names(version).header[1].split()[-1]
        assert len(bytes.fromhex(digest)) == hashlib.sha256().digest_size
