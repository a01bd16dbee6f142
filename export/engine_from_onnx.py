"""A TensorRT engine from an exported ONNX file alone: the device side of ``edge-tl export``.

``build_engine_from_onnx(MODEL.onnx, EngineConfig(...))`` needs no run directory and no torch: the
ONNX file's metadata (written by ``edge-tl export``) gives the stage, the input size and the
preprocessing, which the engine manifest carries on so that ``verify``, ``bench`` and ``predict``
can feed the engine. The ONNX manifest beside the file, when present, names the verification
pack and, for the implicit-INT8 file, its calibration cache; both are recorded in the engine's
manifest with their sha256.

Which file builds which engine (decided by :func:`export.tensorrt_compat.plan_build`):

- FP16: ``model.<stage>.fp32.onnx`` with the FP16 flag on TensorRT <= 10;
  ``model.<stage>.fp16.onnx`` on TensorRT 11 (strongly typed: the file's types decide);
- INT8 on the GPU: the TensorRT Q/DQ file ``model.<stage>.int8-trt.onnx``;
- INT8 on DLA with TensorRT <= 10: the implicit path DLA supports, ``model.<stage>.int8-implicit.onnx``
  (an FP32 graph of the very weights the calibration ranges describe) with its calibration cache
  ``model.<stage>.int8-implicit.calib``. The cache's header is rewritten to this machine's TensorRT
  version (its scales come from calibration.json, not from a TensorRT calibration run).

Files are built in a hidden staging folder beside the engine and moved into place only when the
build and its precision check succeeded; the manifest is written last.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_tl.artifacts import atomic_write_json, read_json, sha256_file
from edge_tl.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

ENGINE_PRECISIONS = ("fp16", "int8")
REQUIRED_METADATA = ("stage", "precision", "input_size", "mean", "std", "class_names", "input_name", "output_name")


@dataclass(frozen=True)
class EngineConfig:
    """What to build: precision, DLA core, the batch profile (min 1, opt and max ``max_batch``), the
    builder workspace, a timing cache, the implicit-INT8 cache (default: the one the ONNX manifest
    names) and the engine file (default: ``model.<stage>.<precision>.engine`` beside the ONNX)."""

    format: str = "engine"
    precision: str = "fp16"
    dla_core: int | None = None
    max_batch: int = 8
    workspace_mb: int = 1024
    timing_cache: str | None = None
    calibration_cache: str | None = None
    out: str | None = None


def _positive_int(label: str, value: Any, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label} {value!r} must be an integer >= 1, e.g. {example}")


def validate_engine_config(cfg: EngineConfig) -> None:
    """Every check on the settings alone, before the ONNX file is read."""
    if cfg.format != "engine":
        raise ConfigError(f"--format {cfg.format} of an .onnx file: an ONNX file builds an engine (--format engine); "
                          "ONNX exports start from a run directory")
    if cfg.precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision} is not an engine precision; use fp16 or int8 (an FP32 engine "
                          "gains nothing over the FP32 ONNX)")
    _positive_int("--max-batch", cfg.max_batch, 8)
    _positive_int("--workspace", cfg.workspace_mb, 1024)
    if cfg.dla_core is not None and (isinstance(cfg.dla_core, bool) or not isinstance(cfg.dla_core, int)
                                     or cfg.dla_core < 0):
        raise ConfigError(f"--dla-core {cfg.dla_core!r} must be an integer >= 0 (Jetson AGX Orin has cores 0 and 1)")
    if cfg.calibration_cache is not None and cfg.precision != "int8":
        raise ConfigError("--calibration-cache applies to --precision int8 only; drop it")


@dataclass(frozen=True)
class OnnxFacts:
    """What the builder needs to know about an exported ONNX file, read without TensorRT."""

    path: Path
    metadata: dict[str, Any]
    qdq_nodes: int
    dynamic_batch: bool
    opset: int
    manifest: dict[str, Any]

    @property
    def img_size(self) -> int:
        return int(self.metadata["input_size"][0])


def read_onnx_facts(onnx_path: str | os.PathLike) -> OnnxFacts:
    """Metadata, Q/DQ node count, batch dimension, opset and manifest (``{}`` when absent) of a file."""
    import onnx

    from export.onnx_metadata import read_onnx_metadata

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; copy the exported ONNX file (RUN_DIR/export/*.onnx) here")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends for a file that is not ONNX
        raise ArtifactError(f"{path} is not a readable ONNX file ({err}); copy it again") from err
    metadata = read_onnx_metadata(model)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ArtifactError(f"{path.name} lacks the metadata {', '.join(missing)}; export it with `edge-tl export "
                            "RUN_DIR` (it carries the preprocessing an engine needs)")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    opset = max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)
    manifest_file = Path(f"{path}.json")
    manifest = read_json(manifest_file) if manifest_file.is_file() else {}
    return OnnxFacts(path, metadata, sum(node.op_type == "QuantizeLinear" for node in model.graph.node),
                     not batch.HasField("dim_value"), opset, manifest)


def int8_source(facts: OnnxFacts) -> str:
    """``qdq`` for a Q/DQ file, ``cache`` for an FP32 file (implicit INT8 from a calibration cache)."""
    if facts.qdq_nodes:
        return "qdq"
    if facts.metadata.get("precision") != "fp32":
        raise ConfigError(f"{facts.path.name} is a {facts.metadata.get('precision')} ONNX without Q/DQ nodes; INT8 "
                          "builds from model.STAGE.int8-trt.onnx (GPU) or model.STAGE.int8-implicit.onnx with its cache")
    return "cache"


def check_source_file(facts: OnnxFacts, plan, trt_version: str) -> None:
    """The ONNX file must be the kind ``plan`` builds from; the message names the right file."""
    stage, precision = facts.metadata["stage"], facts.metadata["precision"]
    if plan.onnx_kind == "qdq":
        if not facts.qdq_nodes:
            raise ConfigError(f"{facts.path.name} has no Q/DQ nodes; this INT8 build needs the TensorRT Q/DQ file "
                              f"model.{stage}.int8-trt.onnx (`edge-tl export RUN_DIR --precision int8 --target tensorrt`)")
        return
    wanted = (f"model.{stage}.int8-implicit.onnx with its .calib" if plan.calibration_cache
              else f"model.{stage}.{plan.onnx_kind}.onnx")
    if facts.qdq_nodes or precision != ("fp32" if plan.calibration_cache else plan.onnx_kind):
        raise ConfigError(f"{facts.path.name} is a {precision} ONNX{' with Q/DQ nodes' if facts.qdq_nodes else ''}; "
                          f"with TensorRT {trt_version} this {'DLA ' if plan.dla_core is not None else ''}"
                          f"engine builds from {wanted}")


def _calibration_cache(facts: OnnxFacts, cfg: EngineConfig, trt_version: str, staging: Path) -> tuple[Path, dict]:
    """The implicit-INT8 cache, re-tagged for ``trt_version`` in ``staging``; and what the manifest says of it."""
    from calibrate.tensorrt_cache import read_calibration_cache, write_calibration_cache

    paired = facts.manifest.get("calibration_cache") or {}
    if cfg.calibration_cache is not None:
        source = Path(cfg.calibration_cache)
    elif paired.get("file"):
        source = facts.path.parent / paired["file"]
    else:
        raise ConfigError(f"INT8 from the FP32 file {facts.path.name} needs its calibration cache; pass "
                          f"--calibration-cache FILE or build from model.{facts.metadata['stage']}.int8-implicit.onnx "
                          "with its manifest and .calib beside it")
    digest = sha256_file(source) if source.is_file() else None
    if paired.get("sha256") and cfg.calibration_cache is None and digest != paired["sha256"]:
        raise ArtifactError(f"{source} does not match the cache {facts.path.name}'s manifest pairs it with (sha256); "
                            "copy both files from the same export")
    cache = read_calibration_cache(source)
    retagged = staging / source.name
    write_calibration_cache(retagged, cache.scales, trt_version, cache.algorithm)
    return retagged, {"file": source.name, "sha256": digest, "paired_with_onnx": digest == paired.get("sha256"),
                      "tensors": len(cache.scales), "version_tag_written": trt_version}


def default_engine_path(facts: OnnxFacts, precision: str) -> Path:
    return facts.path.parent / f"model.{facts.metadata['stage']}.{precision}.engine"


def build_engine_from_onnx(onnx_path: str | os.PathLike, cfg: EngineConfig = EngineConfig()) -> dict[str, Any]:
    """Build an engine from ``onnx_path`` with the installed TensorRT; returns the manifest (as
    written, plus ``path``). Needs TensorRT and pycuda (``[tensorrt]``, or JetPack's)."""
    from export.tensorrt_build import build_engine, manifest_path
    from export.tensorrt_compat import import_tensorrt, plan_build

    validate_engine_config(cfg)
    facts = read_onnx_facts(onnx_path)
    if cfg.max_batch > 1 and not facts.dynamic_batch:
        raise ConfigError(f"{facts.path.name} has a fixed batch of 1; --max-batch {cfg.max_batch} needs a "
                          "dynamic-batch export (drop --max-batch, or re-export without --static-batch)")
    trt = import_tensorrt()
    source = int8_source(facts) if cfg.precision == "int8" else "qdq"
    plan = plan_build(trt.__version__, cfg.precision, source, cfg.dla_core)
    check_source_file(facts, plan, trt.__version__)
    final = Path(cfg.out) if cfg.out else default_engine_path(facts, cfg.precision)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".engine-", suffix=".partial", dir=final.parent))
    try:
        cache_path, cache_facts = (_calibration_cache(facts, cfg, trt.__version__, staging) if plan.calibration_cache
                                   else (None, None))
        staged = staging / final.name
        pack = facts.manifest.get("verification_pack")
        built = build_engine(
            facts.path, staged, cfg.precision, facts.img_size, int8_source=source, calibration_cache=cache_path,
            calibration_hash=(facts.manifest.get("calibration") or {}).get("sha256"), dla_core=cfg.dla_core,
            workspace_mb=cfg.workspace_mb, timing_cache=cfg.timing_cache, max_batch=cfg.max_batch,
        )
        manifest = {
            **built, "artifact": final.name, "artifact_format": "engine", "stage": facts.metadata["stage"],
            "metadata": {**facts.metadata, "precision": cfg.precision},
            "source_onnx": {"file": facts.path.name, "sha256": sha256_file(facts.path)},
            "source_onnx_manifest": f"{facts.path.name}.json" if facts.manifest else None,
            "run_json_sha256": facts.manifest.get("run_json_sha256"),
            "calibration": facts.manifest.get("calibration"), "calibration_cache": cache_facts,
            "verification_pack": pack, "sha256": sha256_file(staged), "size_bytes": staged.stat().st_size,
        }
        manifest_path(final).unlink(missing_ok=True)
        os.replace(staged, final)
        atomic_write_json(manifest_path(final), manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["path"] = str(final)
    logger.info("built %s (%s, TensorRT %s) from %s", final, cfg.precision, trt.__version__, facts.path.name)
    return manifest
