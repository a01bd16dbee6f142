"""The export stage: a run's float or pruned model -> an ONNX file or TensorRT engine with a manifest.

``export_artifact(run_dir, ExportConfig(...))`` writes into ``RUN_DIR/export/``:

- ONNX: ``model.<stage>.<precision>.onnx`` (``model.<stage>.int8-trt.onnx`` for the TensorRT Q/DQ
  flavour) carrying the run's preprocessing in its metadata, and its manifest
  ``<file>.onnx.json`` (parity with PyTorch, sha256, size, opset, calibration hash, versions);
- the TensorRT Q/DQ INT8 file also brings the implicit-INT8 pair ``model.<stage>.int8-implicit.onnx``
  (an FP32 graph of the very weights calibration.json describes) and its TensorRT calibration cache
  ``model.<stage>.int8-implicit.calib``: what DLA and TensorRT <= 10 build implicit INT8 from;
- engines: ``model.<stage>.<precision>.engine``: the ONNX file :func:`export.tensorrt_compat.plan_build`
  asks for is exported first (with its manifest), then built exactly as the device builds it
  (:func:`export.engine_from_onnx.build_engine_from_onnx`), with the manifest
  ``<file>.engine.manifest.json`` carrying the preprocessing metadata so ``verify`` can feed it;
- ``verify-pack.<stage>.json`` (:mod:`edge_tl.verify_pack`): the float model's logits on the
  validation images, for verifying on the device; every manifest records its sha256.

INT8 reads ``RUN_DIR/quantized/<stage>/calibration.json``; when that quantize run tuned weights
(QAT, or the PTQ head refit: ``model.safetensors`` beside it, folded weights) those are exported,
and the manifest says so. Layers without an entry in calibration.json (by default the classifier head, see
calibrate/FORMAT.md) stay float in both Q/DQ flavours; ``int8.float_layers`` names them. Every check on the request runs before any model is loaded. Files are built in a hidden
staging folder inside ``export/`` and moved into place only when everything succeeded, an old
manifest is removed before its artifact is replaced, and the new manifest is written last: a
failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from calibrate.calibration_file import Calibration, read_calibration
from edge_tl.artifacts import atomic_write_json, load_weights, read_json, sha256_file
from edge_tl.data import run_crop
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.gate import DEFAULT_CONFIDENCE, DEFAULT_MAX_DROP, DEFAULT_MAX_ESCAPE_RISE
from edge_tl.machine import library_versions
from edge_tl.prune_stage import load_stage_model
from edge_tl.quantize_config import check_quantize_outputs
from edge_tl.run_lock import run_lock

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "engine")
PRECISIONS = ("fp32", "fp16", "int8")
STAGES = ("float", "pruned")
QDQ_TARGETS = ("onnxruntime", "tensorrt")
MIN_OPSET, MAX_OPSET = 13, 21
MANIFEST_FORMAT = "edge-tl-export"
MANIFEST_VERSION = 1
_ONNX_FOR_PLAN = {"fp32": "fp32", "fp16": "fp16", "qdq": "int8"}
# the TensorRT version tag written into implicit-INT8 caches: JetPack 6.1+'s; TensorRT ignores a
# cache tagged for another version, so a device build rewrites the tag to its own (engine_from_onnx)
IMPLICIT_CACHE_TRT_VERSION = "10.3.0"


@dataclass(frozen=True)
class ExportConfig:
    """What to export. ``target`` picks the INT8 Q/DQ flavour of an ONNX export (engines always use
    the TensorRT one); ``dla_core``, ``workspace_mb`` and ``timing_cache`` apply to engines only.
    ``max_drop``, ``max_escape_rise``, ``confidence`` and ``unlabelled`` are the gate the stage's
    verification pack carries to the device (as :func:`edge_tl.verify.verify` takes them)."""

    format: str = "onnx"
    precision: str = "fp32"
    stage: str = "float"
    opset: int = 17
    dynamic_batch: bool = True
    target: str = "onnxruntime"
    dla_core: int | None = None
    workspace_mb: int = 1024
    timing_cache: str | None = None
    max_batch: int = 1
    max_drop: float = DEFAULT_MAX_DROP
    max_escape_rise: float = DEFAULT_MAX_ESCAPE_RISE
    confidence: float = DEFAULT_CONFIDENCE
    unlabelled: str | None = None


def export_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "export"


def artifact_name(stage: str, precision: str, fmt: str = "onnx", target: str = "onnxruntime") -> str:
    """``model.float.fp32.onnx``, ``model.pruned.int8-trt.onnx``, ``model.float.fp16.engine``, ..."""
    if fmt == "engine":
        return f"model.{stage}.{precision}.engine"
    tag = "int8-trt" if precision == "int8" and target == "tensorrt" else precision
    return f"model.{stage}.{tag}.onnx"


def onnx_manifest_path(onnx_path: str | os.PathLike) -> Path:
    return Path(f"{onnx_path}.json")


def calibration_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / "quantized" / stage / "calibration.json"


def validate_config(cfg: ExportConfig) -> None:
    """Every check on the settings alone, before touching the run directory."""
    for label, value, valid in (("--format", cfg.format, FORMATS), ("--precision", cfg.precision, PRECISIONS),
                                ("--stage", cfg.stage, STAGES), ("Q/DQ target", cfg.target, QDQ_TARGETS)):
        if value not in valid:
            raise ConfigError(f"{label} {value!r} is not one of {', '.join(valid)}")
    if cfg.format == "engine" and cfg.precision == "fp32":
        raise ConfigError("--format engine needs --precision fp16 or int8; an FP32 engine gains nothing, export ONNX fp32")
    if isinstance(cfg.opset, bool) or not isinstance(cfg.opset, int) or not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise ConfigError(f"--opset {cfg.opset!r} is not supported; use {MIN_OPSET} to {MAX_OPSET} (default 17)")
    if not isinstance(cfg.dynamic_batch, bool):
        raise ConfigError(f"dynamic_batch {cfg.dynamic_batch!r} must be True or False")
    if isinstance(cfg.workspace_mb, bool) or not isinstance(cfg.workspace_mb, int) or cfg.workspace_mb < 1:
        raise ConfigError(f"--workspace {cfg.workspace_mb!r} must be an integer number of MB >= 1, e.g. 1024")
    from edge_tl.gate import check_gate_settings

    check_gate_settings(cfg.max_drop, cfg.max_escape_rise, cfg.confidence)
    if isinstance(cfg.max_batch, bool) or not isinstance(cfg.max_batch, int) or cfg.max_batch < 1:
        raise ConfigError(f"--max-batch {cfg.max_batch!r} must be an integer >= 1, e.g. 8")
    if cfg.format == "onnx" and (cfg.dla_core is not None or cfg.timing_cache is not None or cfg.max_batch != 1):
        raise ConfigError("--dla-core, --max-batch and --timing-cache apply to --format engine only; drop them for ONNX")
    if cfg.max_batch > 1 and not cfg.dynamic_batch:
        raise ConfigError(f"--max-batch {cfg.max_batch} needs a dynamic-batch ONNX; drop --static-batch or --max-batch")


def _check_run(run_dir: Path, cfg: ExportConfig) -> None:
    """Every check on the run directory and the installed backends, before any model is loaded."""
    if not (run_dir / "run.json").is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json); run `edge-tl finetune DATA_DIR --out {run_dir}` first")
    if cfg.stage == "pruned" and not (run_dir / "pruned").is_dir():
        raise ArtifactError(f"{run_dir / 'pruned'} does not exist; run `edge-tl prune {run_dir}` first or export --stage float")
    if cfg.precision == "int8":
        _checked_calibration(run_dir, cfg.stage, int(read_json(run_dir / "run.json")["img_size"]))
    if cfg.format == "engine":
        from export.tensorrt_compat import import_tensorrt

        _engine_source(import_tensorrt().__version__, cfg)


def _checked_calibration(run_dir: Path, stage: str, img_size: int) -> tuple[Calibration, Path | None]:
    """calibration.json of ``stage`` and the tuned weights beside it (QAT or a PTQ head refit; else None)."""
    path = calibration_path(run_dir, stage)
    if not path.is_file():
        raise ArtifactError(f"INT8 export needs {path}; run `edge-tl quantize {run_dir} --stage {stage}` first")
    check_quantize_outputs(run_dir, stage)
    calibration = read_calibration(path)
    recorded_stage, recorded_size = calibration.model.get("stage"), calibration.model.get("img_size")
    if recorded_stage not in (None, stage):
        raise ArtifactError(f"{path} was made for stage {recorded_stage!r}, not {stage!r}; rerun `edge-tl quantize --stage {stage}`")
    if recorded_size not in (None, img_size):
        raise ArtifactError(f"{path} was made at {recorded_size} px, the run uses {img_size} px; rerun `edge-tl quantize`")
    weights_path = path.parent / "model.safetensors"
    tuned = calibration.model.get("mode") == "qat" or bool(calibration.model.get("tuned_weights"))
    if tuned and not weights_path.is_file():
        raise ArtifactError(f"{path} refers to tuned weights but {weights_path} is missing; rerun `edge-tl quantize`")
    recorded = calibration.model.get("tuned_weights_sha256")
    if tuned and recorded is not None and sha256_file(weights_path) != recorded:
        raise ArtifactError(f"{weights_path} changed since quantize wrote it (its sha256 differs from {path}'s); "
                            f"rerun `edge-tl quantize {run_dir} --stage {stage}`")
    if not tuned and weights_path.is_file():
        raise ArtifactError(f"{weights_path} is left from an older quantize run that {path} does not use; "
                            "delete it or rerun `edge-tl quantize`")
    return calibration, weights_path if weights_path.is_file() else None


def load_int8_model(run_dir: str | os.PathLike, stage: str, model: nn.Module, img_size: int
                    ) -> tuple[nn.Module, Calibration, dict[str, Any]]:
    """(model to quantize, calibration, calibration facts for the manifest) of RUN_DIR/quantized/<stage>.

    The model is ``model`` BN-folded, with the tuned weights of ``quantized/<stage>/model.safetensors``
    when the quantize run was QAT (calibration.json's module names and ranges refer to those weights).
    """
    from edge_tl.fold import fold_batchnorm

    run_dir = Path(run_dir)
    calibration, weights_path = _checked_calibration(run_dir, stage, img_size)
    path = calibration_path(run_dir, stage)
    folded = fold_batchnorm(model)
    facts: dict[str, Any] = {
        "path": path.relative_to(run_dir).as_posix(), "sha256": sha256_file(path), "method": calibration.method,
        "calibration_files_hash": calibration.calibration_files_hash, "mode": calibration.model.get("mode"),
        "weights": "tuned" if weights_path is not None else "stage", "float_modules": list(calibration.float_modules),
    }
    if weights_path is not None:
        try:
            folded.load_state_dict(load_weights(weights_path), strict=True)
        except RuntimeError as err:
            raise ArtifactError(
                f"{weights_path} does not fit the {stage} model ({str(err).splitlines()[0]}); rerun `edge-tl quantize --mode qat`"
            ) from err
        facts["tuned_weights_sha256"] = sha256_file(weights_path)
        logger.info("INT8 export of the %s stage uses the tuned weights of %s", stage, weights_path)
    return folded.eval(), calibration, facts


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """A hidden folder inside ``folder`` for files that are moved into place only on success."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", suffix=".partial", dir=folder))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _publish(staged: Path, final: Path, manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Move a finished artifact into place; its manifest (stale one removed first) comes last."""
    manifest_path.unlink(missing_ok=True)
    os.replace(staged, final)
    atomic_write_json(manifest_path, manifest)


def _pack_facts(run_dir: Path, cfg: ExportConfig) -> dict[str, Any]:
    """The stage's verification pack (written unless current) as the manifest records it."""
    from edge_tl.verify_pack import ensure_pack

    path, digest = ensure_pack(run_dir, cfg.stage, cfg.max_drop, cfg.max_escape_rise, cfg.confidence, cfg.unlabelled)
    return {"file": path.name, "sha256": digest}


def versions() -> dict[str, str]:
    """What an export manifest records of the software that made it."""
    return library_versions("edge_tl", "onnx", "onnxruntime")


def _torch_parity(onnx_path: Path, model: nn.Module, img_size: int, dynamic_batch: bool) -> float:
    """max |ONNX Runtime - PyTorch| on the fixed parity input the exporters use."""
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session, parity_input

    x = parity_input(img_size, 2 if dynamic_batch else 1)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    got = ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.max(np.abs(got - expected)))


def _export_onnx(run_dir: Path, cfg: ExportConfig, model: nn.Module, run_info: dict) -> dict[str, Any]:
    from export.fp16 import export_fp16_onnx
    from export.onnx_export import check_parity, export_onnx, logit_scale
    from export.onnx_metadata import preprocessing_metadata, read_onnx_metadata
    from export.qdq import export_qdq_onnx

    img_size = int(run_info["img_size"])
    name = artifact_name(cfg.stage, cfg.precision, "onnx", cfg.target)
    final = export_dir(run_dir) / name
    metadata = preprocessing_metadata(img_size, run_info["mean"], run_info["std"], run_info["classes"],
                                      run_info.get("ok_class"), crop=run_crop(run_info), stage=cfg.stage,
                                      backbone=run_info.get("backbone"))
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "artifact": name, "artifact_format": "onnx",
        "stage": cfg.stage, "precision": cfg.precision, "opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch,
        "img_size": img_size, "backbone": run_info.get("backbone"),
        "run_json_sha256": sha256_file(run_dir / "run.json"),
    }
    implicit, reference = None, model  # reference: the PyTorch model parity is measured against
    with _staging(export_dir(run_dir)) as staging:
        staged = staging / name
        if cfg.precision == "fp32":
            report = export_onnx(model, img_size, staged, cfg.opset, cfg.dynamic_batch, metadata)
            manifest["parity_reference"] = f"PyTorch {cfg.stage} model"
        elif cfg.precision == "fp16":
            fp32_path = staging / "fp32.onnx"
            export_onnx(model, img_size, fp32_path, cfg.opset, cfg.dynamic_batch, metadata)
            report = export_fp16_onnx(fp32_path, staged)
            report["max_abs_diff"] = _torch_parity(staged, model, img_size, cfg.dynamic_batch)
            manifest["parity_reference"] = f"PyTorch {cfg.stage} model"
        else:
            quantized, calibration, facts = load_int8_model(run_dir, cfg.stage, model, img_size)
            reference = quantized
            metadata["int8_weights"] = facts["weights"]
            report = export_qdq_onnx(quantized, calibration, img_size, staged, cfg.target, cfg.opset,
                                     cfg.dynamic_batch, metadata)
            manifest["calibration"] = facts
            manifest["qdq_target"] = cfg.target
            manifest["parity_reference"] = (f"PyTorch {cfg.stage} model, BN-folded"
                                            + (", tuned weights" if facts["weights"] == "tuned" else ""))
            manifest["int8"] = {key: report[key] for key in (
                "quantized_weights", "quantized_activations", "float_activations", "float_layers", "activation_dtype",
                "ort_ops")}
            manifest["top1_agreement"] = report["top1_agreement"]
            if cfg.target == "tensorrt":
                implicit = (quantized, calibration, facts)
        manifest.update({
            "max_abs_diff": report["max_abs_diff"],
            "parity_input": f"standard normal, seed 0, batch {2 if cfg.dynamic_batch else 1}",
            "sha256": sha256_file(staged), "size_bytes": staged.stat().st_size,
            "metadata": read_onnx_metadata(staged), "versions": versions(),
        })
        if "max_abs_diff_vs_fp32" in report:
            manifest["max_abs_diff_vs_fp32"] = report["max_abs_diff_vs_fp32"]
        manifest.update(check_parity(report["max_abs_diff"], logit_scale(reference, img_size, 2 if cfg.dynamic_batch else 1),
                                     cfg.precision, final))
        manifest["verification_pack"] = _pack_facts(run_dir, cfg)
        _publish(staged, final, onnx_manifest_path(final), manifest)
    if implicit is not None:
        base = {key: manifest[key] for key in ("format", "version", "artifact_format", "stage", "opset", "dynamic_batch",
                                               "img_size", "backbone", "run_json_sha256")}
        _export_implicit_int8(run_dir, cfg, *implicit, metadata, base)
    manifest["path"] = str(final)
    logger.info("exported %s: %d bytes, max |ONNX - PyTorch| = %.2e", final, manifest["size_bytes"], manifest["max_abs_diff"])
    return manifest


def implicit_int8_names(stage: str) -> tuple[str, str]:
    """The implicit-INT8 pair: an FP32 ONNX of the quantized weights and its TensorRT calibration cache."""
    return f"model.{stage}.int8-implicit.onnx", f"model.{stage}.int8-implicit.calib"


def _export_implicit_int8(run_dir: Path, cfg: ExportConfig, quantized: nn.Module, calibration: Calibration,
                          facts: dict[str, Any], metadata: dict[str, Any], base: dict[str, Any]) -> None:
    """Write the implicit-INT8 pair beside the TensorRT Q/DQ file (for DLA and TensorRT <= 10).

    The ONNX is exported from the very model (BN-folded, tuned weights) the calibration ranges
    describe, and the cache names that file's tensors; its manifest pairs them by sha256. The cache
    header carries :data:`IMPLICIT_CACHE_TRT_VERSION`; the device build rewrites it to its own.
    """
    from export.onnx_export import check_parity, export_onnx, logit_scale
    from export.onnx_metadata import read_onnx_metadata
    from export.onnx_ranges import export_tensorrt_cache

    onnx_name, cache_name = implicit_int8_names(cfg.stage)
    with _staging(export_dir(run_dir)) as staging:
        report = export_onnx(quantized, base["img_size"], staging / onnx_name, cfg.opset, cfg.dynamic_batch,
                             {**metadata, "int8_calibration": "implicit", "int8_weights": facts["weights"]})
        scales = export_tensorrt_cache(staging / onnx_name, quantized, calibration, staging / cache_name,
                                       IMPLICIT_CACHE_TRT_VERSION)
        parity = check_parity(report["max_abs_diff"], logit_scale(quantized, base["img_size"], report["parity_batch"]),
                              "fp32", onnx_name)
        manifest = {
            **base, "artifact": onnx_name, "precision": "fp32", "purpose": "implicit INT8 (DLA, TensorRT <= 10)",
            "calibration": facts, "max_abs_diff": report["max_abs_diff"], **parity,
            "parity_reference": f"PyTorch {cfg.stage} model, BN-folded"
                                + (", tuned weights" if facts["weights"] == "tuned" else ""),
            "calibration_cache": {"file": cache_name, "sha256": sha256_file(staging / cache_name),
                                  "tensors": len(scales), "version_tag_written": IMPLICIT_CACHE_TRT_VERSION},
            "sha256": sha256_file(staging / onnx_name), "size_bytes": (staging / onnx_name).stat().st_size,
            "metadata": read_onnx_metadata(staging / onnx_name), "versions": versions(),
            "verification_pack": _pack_facts(run_dir, cfg),
        }
        final = export_dir(run_dir) / onnx_name
        onnx_manifest_path(final).unlink(missing_ok=True)
        os.replace(staging / cache_name, export_dir(run_dir) / cache_name)
        _publish(staging / onnx_name, final, onnx_manifest_path(final), manifest)


def _engine_source(trt_version: str, cfg: ExportConfig) -> tuple[str, bool]:
    """(ONNX precision to export, whether the implicit-INT8 pair is the source) for an engine request."""
    from export.tensorrt_compat import parse_version, plan_build

    implicit = cfg.precision == "int8" and cfg.dla_core is not None and parse_version(trt_version)[0] < 11
    plan = plan_build(trt_version, cfg.precision, "cache" if implicit else "qdq", cfg.dla_core)
    return _ONNX_FOR_PLAN[plan.onnx_kind] if not plan.calibration_cache else "int8", plan.calibration_cache


def _export_engine(run_dir: Path, cfg: ExportConfig, model: nn.Module, run_info: dict) -> dict[str, Any]:
    """Export the ONNX file the installed TensorRT builds from, then build it as the device would."""
    from export.engine_from_onnx import EngineConfig, build_engine_from_onnx
    from export.tensorrt_compat import import_tensorrt, max_onnx_opset

    trt_version = import_tensorrt().__version__
    onnx_precision, implicit = _engine_source(trt_version, cfg)
    opset = min(cfg.opset, max_onnx_opset(trt_version) or cfg.opset)  # TensorRT 8.5 parses opset 17 at most
    source = _export_onnx(run_dir, replace(cfg, format="onnx", precision=onnx_precision, target="tensorrt", opset=opset,
                                           dla_core=None, timing_cache=None, max_batch=1), model, run_info)
    onnx_path = export_dir(run_dir) / implicit_int8_names(cfg.stage)[0] if implicit else Path(source["path"])
    return build_engine_from_onnx(onnx_path, EngineConfig(
        precision=cfg.precision, dla_core=cfg.dla_core, max_batch=cfg.max_batch, workspace_mb=cfg.workspace_mb,
        timing_cache=cfg.timing_cache, out=str(export_dir(run_dir) / artifact_name(cfg.stage, cfg.precision, "engine")),
    ))


def export_artifact(run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig()) -> dict[str, Any]:
    """Export the run's ``cfg.stage`` model as ``cfg.format``/``cfg.precision``; returns the manifest
    (as written, plus ``path``: the artifact's location)."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    _check_run(run_dir, cfg)
    with run_lock(run_dir):
        model, _ = load_stage_model(run_dir, cfg.stage)
        run_info = read_json(run_dir / "run.json")
        if cfg.format == "engine":
            return _export_engine(run_dir, cfg, model, run_info)
        return _export_onnx(run_dir, cfg, model, run_info)
