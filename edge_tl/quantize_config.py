"""The settings of ``quantize``, their checks, and the check of what a quantize run wrote.

Below :mod:`edge_tl.quantize` and :mod:`edge_tl.qat` (neither imports the other at module level) and
the INT8 export (:func:`export.stage.load_int8_model`), which imports no NNI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibrate.ranges import DEFAULT_PERCENTILE, check_range_method
from edge_tl.artifacts import read_json, sha256_file
from edge_tl.errors import ArtifactError, ConfigError

STAGES = ("float", "pruned")
MODES = ("ptq", "qat")
INPUT_NAME = "input"


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantize run. ``percentile`` applies to ``method='percentile'`` only;
    ``float_head`` keeps the layer producing the logits float (no calibration.json entry),
    ``float_stem`` the layer reading the image;
    ``reconstruct`` re-solves every quantized convolution, after calibration, against the float
    model on ``reconstruct_images`` class-balanced training images (before QAT too);
    ``refit_head`` refits the float head, after PTQ, on the quantized trunk's training-split features."""

    stage: str = "float"
    mode: str = "ptq"
    calib_images: int = 512
    method: str = "minmax"
    qat_epochs: int = 3
    qat_lr: float = 1e-5
    batch_size: int = 16
    seed: int = 0
    percentile: float = DEFAULT_PERCENTILE
    float_head: bool = True
    float_stem: bool = True
    refit_head: bool = False  # PTQ with a float head: refit it on the quantized trunk's training features
    reconstruct: bool = True  # re-solve each quantized conv against the float model (edge_tl/reconstruct.py)
    reconstruct_images: int = 512


def validate_config(cfg: QuantizeConfig) -> None:
    """Every check on the settings, before any work."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"--stage {cfg.stage!r} is not one of {', '.join(STAGES)}")
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    check_range_method(cfg.method, cfg.percentile)
    if not isinstance(cfg.float_head, bool):
        raise ConfigError(f"float_head {cfg.float_head!r} must be true or false (true keeps the classifier head float)")
    if not isinstance(cfg.float_stem, bool):
        raise ConfigError(f"float_stem {cfg.float_stem!r} must be true or false "
                          "(true keeps the stem convolution float)")
    if not isinstance(cfg.refit_head, bool):
        raise ConfigError(f"refit_head {cfg.refit_head!r} must be true or false (true refits the float head after PTQ)")
    if not isinstance(cfg.reconstruct, bool):
        raise ConfigError(f"reconstruct {cfg.reconstruct!r} must be true or false (true re-solves the quantized "
                          "weights against the float model)")
    for name, value in (("--calib-images", cfg.calib_images), ("batch size", cfg.batch_size),
                        ("reconstruct images", cfg.reconstruct_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r} must be an integer >= 1, e.g. 512 calibration images")
    if cfg.mode == "qat":
        if isinstance(cfg.qat_epochs, bool) or not isinstance(cfg.qat_epochs, int) or cfg.qat_epochs < 1:
            raise ConfigError(f"QAT epochs {cfg.qat_epochs!r} must be an integer >= 1, e.g. 3")
        if not 0.0 < cfg.qat_lr < 1.0:
            raise ConfigError(f"QAT learning rate {cfg.qat_lr!r} must lie in (0, 1), e.g. 1e-5")


def quantized_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "quantized" / stage


def check_quantize_outputs(run_dir: str | Path, stage: str, require_manifest: bool = False) -> None:
    """Every file RUN_DIR/quantized/<stage>/metrics.json lists must still have the sha256 quantize recorded.

    ``metrics.json`` is the manifest quantize writes last; without it (``require_manifest`` False) there is
    nothing to check here: a hand-made calibration.json, whose tuned weights (if any) calibration.json
    itself pins by sha256 (checked by the INT8 export).
    """
    out = quantized_dir(run_dir, stage)
    if not (out / "metrics.json").is_file():
        if require_manifest:
            raise ArtifactError(f"{out} holds no finished quantize run; run `edge-tl quantize {run_dir} --stage {stage}` first")
        return
    for name, digest in read_json(out / "metrics.json").get("files", {}).items():
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            raise ArtifactError(f"{out / name} is missing or changed since quantize wrote it; "
                                f"rerun `edge-tl quantize {run_dir} --stage {stage}`")
