"""export/engine_from_onnx.py: an engine from an exported ONNX file alone, on each TensorRT version's names.

TensorRT cannot run here: the builds go through the strict per-version stand-ins of
tests/tensorrt_api_fake.py (real API names, no engine), so what is tested is edge-tl's side of the
device build: which file each plan takes, the refusal of the wrong file naming the right one, the
implicit-INT8 cache re-tagged for the installed version, the batch profile, and the published engine
and manifest (preprocessing metadata, source ONNX and verification pack carried on, nothing left in
staging). Whether a real TensorRT builds these engines is not tested.
"""
from __future__ import annotations

import onnx
import pytest

from calibrate.tensorrt_cache import read_calibration_cache, tensorrt_version_tag, write_calibration_cache
from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.errors import ConfigError
from export.engine_from_onnx import EngineConfig, build_engine_from_onnx
from export.onnx_metadata import metadata_props, set_metadata
from export.tensorrt_build import manifest_path
from export.tensorrt_compat import parse_version, plan_build
from tensorrt_api_fake import VERSIONS, inspector_for, install, tiny_onnx

PX = 32
CLASSES = ["crack", "ok", "scratch", "spot"]
PACK = {"file": "verify-pack.float.json", "sha256": "ab" * 32}


def _exported(tmp_path, kind: str, name: str, **manifest_extra) -> object:
    """``tiny_onnx`` of ``kind`` with the metadata and manifest ``edge-tl export`` writes."""
    path = tiny_onnx(tmp_path / name, kind)
    model = onnx.load(str(path))
    precision = {"fp32": "fp32", "fp16": "fp16", "qdq": "int8"}[kind]
    set_metadata(model, metadata_props({"mean": [0.5] * 3, "std": [0.25] * 3, "class_names": CLASSES,
                                        "ok_class": "ok", "stage": "float", "precision": precision}, PX, "input",
                                       "logits"))
    onnx.save(model, str(path))
    atomic_write_json(f"{path}.json", {"artifact": name, "verification_pack": PACK, **manifest_extra})
    return path


def _file_for(plan) -> tuple[str, str]:
    if plan.calibration_cache:
        return "fp32", "model.float.int8-implicit.onnx"
    return plan.onnx_kind, {"fp32": "model.float.fp32.onnx", "fp16": "model.float.fp16.onnx",
                            "qdq": "model.float.int8-trt.onnx"}[plan.onnx_kind]


def _requests(version: str) -> list[tuple[str, int | None]]:
    if parse_version(version)[0] >= 11:
        return [("fp16", None), ("int8", None)]
    return [("fp16", None), ("int8", None), ("int8", 0)]


@pytest.mark.parametrize("version", VERSIONS)
def test_each_plan_builds_from_its_file_and_publishes_engine_and_manifest(monkeypatch, tmp_path, version):
    for precision, dla_core in _requests(version):
        folder = tmp_path / f"{precision}-{dla_core}"
        folder.mkdir()
        plan = plan_build(version, precision, "cache" if dla_core is not None else "qdq", dla_core)
        trt, _ = install(monkeypatch, version, inspector=inspector_for(plan),
                         profile_shape=((1, 3, PX, PX), (4, 3, PX, PX), (4, 3, PX, PX)))
        kind, name = _file_for(plan)
        extra = {}
        if plan.calibration_cache:  # as the workstation writes it: tagged for JetPack 6's TensorRT 10.3
            write_calibration_cache(folder / "model.float.int8-implicit.calib", {"input": 0.02, "s": 0.1}, "10.3.0")
            extra["calibration_cache"] = {"file": "model.float.int8-implicit.calib",
                                          "sha256": sha256_file(folder / "model.float.int8-implicit.calib")}
        onnx_path = _exported(folder, kind, name, **extra)
        manifest = build_engine_from_onnx(onnx_path, EngineConfig(precision=precision, dla_core=dla_core, max_batch=4))
        engine = folder / f"model.float.{precision}.engine"
        assert manifest["path"] == str(engine) and engine.read_bytes() == b"serialized engine"
        on_disk = read_json(manifest_path(engine))
        assert on_disk == {key: value for key, value in manifest.items() if key != "path"}
        assert on_disk["metadata"]["class_names"] == CLASSES and on_disk["metadata"]["precision"] == precision
        assert on_disk["source_onnx"] == {"file": name, "sha256": sha256_file(onnx_path)}
        assert on_disk["verification_pack"] == PACK and on_disk["settings"]["max_batch"] == 4
        assert trt.profiles[0] == ("input", (1, 3, PX, PX), (4, 3, PX, PX), (4, 3, PX, PX))
        if plan.calibration_cache:  # TensorRT was handed the cache re-tagged for its own version
            handed = trt.calibration_cache_read.decode()
            assert handed.splitlines()[0] == f"TRT-{tensorrt_version_tag(version)}-EntropyCalibration2"
            assert on_disk["calibration_cache"]["paired_with_onnx"] is True
            original = read_calibration_cache(folder / "model.float.int8-implicit.calib")
            assert original.version_tag == 100300  # the shipped file is left as it was
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("version", [v for v in VERSIONS if parse_version(v)[0] < 11])
def test_the_wrong_file_is_refused_naming_the_right_one(monkeypatch, tmp_path, version):
    install(monkeypatch, version)
    qdq = _exported(tmp_path, "qdq", "model.float.int8-trt.onnx")
    with pytest.raises(ConfigError, match=r"DLA engine builds from model\.float\.int8-implicit\.onnx with its \.calib"):
        build_engine_from_onnx(qdq, EngineConfig(precision="int8", dla_core=0))
    fp32 = _exported(tmp_path, "fp32", "model.float.fp32.onnx")
    with pytest.raises(ConfigError, match=r"needs its calibration cache; pass --calibration-cache FILE"):
        build_engine_from_onnx(fp32, EngineConfig(precision="int8", dla_core=0))
    assert not list(tmp_path.glob("*.engine*")) and not list(tmp_path.glob(".engine-*"))


def test_tensorrt_11_needs_the_fp16_file_and_q_dq_for_int8(monkeypatch, tmp_path):
    version = next(v for v in VERSIONS if parse_version(v)[0] >= 11)
    install(monkeypatch, version)
    fp32 = _exported(tmp_path, "fp32", "model.float.fp32.onnx")
    with pytest.raises(ConfigError, match=rf"with TensorRT {version} this engine builds from model\.float\.fp16\.onnx"):
        build_engine_from_onnx(fp32, EngineConfig(precision="fp16"))
    with pytest.raises(ConfigError, match=rf"TensorRT {version} has no implicit INT8 calibration"):
        build_engine_from_onnx(fp32, EngineConfig(precision="int8"))
