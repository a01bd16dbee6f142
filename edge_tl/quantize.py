"""INT8 quantization of a run's float or pruned model with NNI 3.0: PTQ ranges, optional QAT.

``quantize(run_dir, cfg)`` folds BatchNorm into the convolutions (:func:`edge_tl.fold.fold_batchnorm`)
and quantizes the Conv2d and Linear modules of the folded model that
:func:`calibrate.observe.quantization_plan` picks: weights per output channel, symmetric int8
(``scale = absmax / 127``); the module input per tensor, asymmetric uint8 over the calibrated
range widened to include 0; the module output too where no quantized consumer re-quantizes it.
With ``float_head`` (the default) the classifier head, the layer producing the logits, stays
float: it is a standardised logistic regression folded into one Linear whose rows have a few
large weights (max/median |w| 70-160 on magnetic-tile), so int8 rows round most weights to a few
levels (-2.2 balanced-accuracy points there). It gets no calibration.json entry, which is what
keeps it float in the Q/DQ export too, and calibration.json's ``model.float_modules`` names it.
With ``float_stem`` (the default) the stem, the convolution reading the image, stays float too: its
3 input channels carry the whole image through one per-tensor uint8 scale; on magnetic-tile the
float stem took the INT8 ONNX's training-split disagreements with the float model from 9 to 6 of
1076 images (mean logit error 0.118 -> 0.108), for 2% of the MACs and no measurable latency at 1 thread.

PTQ runs NNI's PtqQuantizer over class-balanced calibration images from the training split only.
``minmax`` takes NNI's tracked ranges; ``percentile`` and ``entropy`` feed the same tensors to
:class:`calibrate.ranges.RangeObserver`. The numbers follow calibrate/FORMAT.md and are written
back into NNI's target spaces, so the fake-quantized model is exactly what calibration.json says.
QAT continues with NNI's QATQuantizer from those ranges (activation ranges then follow NNI's
moving average) and keeps the epoch with the best validation balanced accuracy (PTQ included).

Output in ``RUN_DIR/quantized/<stage>/`` (one layout for ptq and qat; the latest run wins):
``calibration.json``, for qat or a refit head ``model.safetensors`` (the tuned state dict of the folded model,
which the INT8 export must use instead of the stage's weights), and ``metrics.json`` last.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibrate.calibration_file import Calibration, CalibrationTensor, read_calibration, write_calibration
from calibrate.observe import input_layers, output_layers, quantization_plan
from calibrate.ranges import RangeObserver
from calibrate.sources import ClassBalancedSource, iter_batches
from edge_tl import data as data_mod
from edge_tl import nni_compat
from edge_tl.artifacts import atomic_write_json, save_weights, sha256_file
from edge_tl.checkpoint import run_records
from edge_tl.errors import ConfigError
from edge_tl.fold import fold_batchnorm
from edge_tl.head_refit import refit_head
from edge_tl.metrics import classification_metrics
from edge_tl.prune_stage import load_stage_model
from edge_tl.quantize_config import (  # noqa: F401  (MODES, validate_config: old import path)
    INPUT_NAME,
    MODES,
    STAGES,
    QuantizeConfig,
    check_quantize_outputs,
    quantized_dir,
    validate_config,
)
from edge_tl.quantize_targets import NNI_TARGETS, apply_calibration, current_tensors, nni_config_list, tensor_logits
from edge_tl.reconstruct import reconstruct_weights
from edge_tl.run_lock import run_lock

from nni.compression.quantization import PtqQuantizer  # after nni_compat: NNI import warnings

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class QuantizeResult:
    calibration_path: Path
    metrics: dict
    model_path: Path | None = None  # tuned folded weights (QAT, or PTQ with a refit head)


def _calibrate(folded: nn.Module, plan, source: ClassBalancedSource,
               cfg: QuantizeConfig) -> tuple[PtqQuantizer, list[CalibrationTensor]]:
    """NNI PTQ over the calibration source; returns the (fake-quantizing) quantizer and the tensors."""
    num_batches = -(-len(source) // source.batch_size)

    def calibration_pass(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(iter_batches(source)):
                if max_steps is not None and index >= max_steps:
                    break
                model(torch.from_numpy(batch))

    optimizer = nni_compat.traced_optimizer(torch.optim.SGD, folded.parameters(), lr=0.0)  # never steps
    evaluator = nni_compat.TorchEvaluator(calibration_pass, optimizer, lambda batch, model: None,
                                          evaluating_func=lambda model: None)
    with nni_compat.quiet_nni():
        quantizer = PtqQuantizer(folded, nni_config_list(plan), evaluator)
    observers: dict[tuple[str, str], RangeObserver] = {}

    def observe(module_name: str, target_name: str, tensor: torch.Tensor) -> None:
        if target_name != "weight":
            observers.setdefault((module_name, target_name), RangeObserver()).update(tensor.float().cpu().numpy())

    remove = nni_compat.add_track_callback(quantizer, observe) if cfg.method != "minmax" else (lambda: None)
    try:
        with nni_compat.quiet_nni():
            quantizer.compress(max_steps=num_batches, max_epochs=1)
    finally:
        remove()
    nni_compat.stop_ptq_tracking(quantizer)
    tensors = current_tensors(quantizer, plan)  # exact weights; NNI's tracked min/max for activations
    if cfg.method != "minmax":
        tensors = [tensor if tensor.role == "weight" else _observed(tensor, observers, cfg) for tensor in tensors]
    apply_calibration(quantizer, tensors)
    return quantizer, tensors


def _observed(tensor: CalibrationTensor, observers: dict, cfg: QuantizeConfig) -> CalibrationTensor:
    """``tensor`` with the percentile/entropy range of the activations its observer saw."""
    observer = observers[(tensor.module, NNI_TARGETS[tensor.role])]
    # float32 like NNI's tracked ranges, so QAT (which keeps ranges in float32) starts from these exact numbers
    low, high = (float(np.float32(value)) for value in observer.compute(cfg.method, cfg.percentile))
    return CalibrationTensor.activation(tensor.module, tensor.role, low, high, observed_min=observer.min_value,
                                        observed_max=observer.max_value)


def _reconstruct(quantizer, folded: nn.Module, tensors: list[CalibrationTensor], source: ClassBalancedSource,
                 evaluate, metrics: dict) -> tuple[dict, list[CalibrationTensor], dict]:
    """Weight reconstruction (edge_tl/reconstruct.py) of the calibrated model, kept only when it brings
    the fake-quantized validation logits closer to the float model's (``logit_error``, what the
    reconstruction minimises layer by layer); returns (metrics, tensors, summary).

    Not balanced accuracy: on magnetic-tile's 268 validation images it moved by 0.0001 when a
    reconstruction that lowered the logit error was discarded on it, and the INT8 ONNX then
    agreed with its float model on 0.963 of the images instead of 0.993."""
    def rewrap(calibration: list[CalibrationTensor]) -> None:
        # NNI's wrap() restores weights from its target spaces: sync them with the weights now in folded
        nni_compat.sync_weight_targets(quantizer, folded)
        quantizer.wrap_model()
        apply_calibration(quantizer, calibration)

    start = time.perf_counter()
    quantizer.unwrap_model()
    before = copy.deepcopy(folded.state_dict())
    rebuilt = reconstruct_weights(folded, tensors, iter_batches(source))
    rewrap(rebuilt)
    after = evaluate(folded)
    kept = after["logit_error"] <= metrics["logit_error"]
    if not kept:
        quantizer.unwrap_model()
        folded.load_state_dict(before)
        rewrap(tensors)
    log.info("weight reconstruction: logit error %.4f -> %.4f, balanced accuracy %.4f -> %.4f (%s)",
             metrics["logit_error"], after["logit_error"], metrics["balanced_accuracy"], after["balanced_accuracy"],
             "kept" if kept else "discarded")
    summary = {"kept": kept, "balanced_accuracy_before": metrics["balanced_accuracy"],
               "balanced_accuracy_after": after["balanced_accuracy"], "logit_error_before": metrics["logit_error"],
               "logit_error_after": after["logit_error"], "images": len(source),
               "seconds": round(time.perf_counter() - start, 1)}
    return (after, rebuilt, summary) if kept else (metrics, tensors, summary)


def quantize(run_dir: str | Path, cfg: QuantizeConfig = QuantizeConfig()) -> QuantizeResult:
    """PTQ (and QAT) of the run's ``cfg.stage`` model; writes RUN_DIR/quantized/<stage>/ (under the run's lock)."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _quantize(run_dir, cfg)


def _quantize(run_dir: Path, cfg: QuantizeConfig) -> QuantizeResult:
    model, run_info = load_stage_model(run_dir, cfg.stage)
    size, mean, std, classes = run_info["img_size"], run_info["mean"], run_info["std"], run_info["classes"]
    val = run_records(run_info, "val")
    crop = data_mod.run_crop(run_info)
    source = ClassBalancedSource(run_records(run_info, "train"), cfg.calib_images, size, mean, std,
                                 batch_size=cfg.batch_size, seed=cfg.seed, input_name=INPUT_NAME, crop=crop)
    val_images = torch.from_numpy(data_mod.load_tensor_batch(val, size, mean, std, crop=crop))  # inference transform
    val_labels = np.array([r.label for r in val])

    def scored(logits: np.ndarray) -> dict:
        """Validation metrics, and ``logit_error``: mean |logits - float model's logits|."""
        metrics = classification_metrics(val_labels, logits.argmax(1), classes, run_info.get("ok_class"))
        return {**metrics, "logit_error": float(np.mean(np.abs(logits - float_logits)))}

    def evaluate(net: nn.Module) -> dict:
        return scored(tensor_logits(net, val_images))

    float_logits = tensor_logits(model, val_images)
    float_metrics = scored(float_logits)
    folded = fold_batchnorm(model)
    float_modules = sorted({*(output_layers(folded) if cfg.float_head else ()),
                            *(input_layers(folded) if cfg.float_stem else ())})
    plan = quantization_plan(folded, float_modules)
    torch.manual_seed(cfg.seed)
    quantizer, tensors = _calibrate(folded, plan, source, cfg)
    metrics = evaluate(folded)
    extra = {"ptq_balanced_accuracy": metrics["balanced_accuracy"]}
    if cfg.reconstruct:
        reconstruction_source = source if cfg.reconstruct_images >= len(source) else ClassBalancedSource(
            run_records(run_info, "train"), cfg.reconstruct_images, size, mean, std, batch_size=cfg.batch_size,
            seed=cfg.seed, input_name=INPUT_NAME, crop=crop)
        metrics, tensors, extra["reconstruction"] = _reconstruct(quantizer, folded, tensors, reconstruction_source,
                                                                 evaluate, metrics)
    if cfg.mode == "ptq" and cfg.float_head and cfg.refit_head:
        metrics, extra["head_refit"] = refit_head(folded, run_info, evaluate, metrics)
    if cfg.mode == "qat":
        quantizer.unwrap_model()
        from edge_tl.qat import qat  # its NNI training loop, only when asked for

        quantizer, tensors, extra["qat_history"] = qat(folded, model, plan, tensors, run_info, val_images,
                                                       val_labels, cfg)
        metrics = evaluate(folded)
    quantizer.unwrap_model()
    metrics.update({
        "stage": cfg.stage, "mode": cfg.mode, "method": cfg.method, "calib_images": len(source),
        "float_head": cfg.float_head, "float_stem": cfg.float_stem, "float_modules": float_modules,
        "float_balanced_accuracy": float_metrics["balanced_accuracy"],
        "balanced_accuracy_delta": 100.0 * (metrics["balanced_accuracy"] - float_metrics["balanced_accuracy"]),
        **({"percentile": cfg.percentile} if cfg.method == "percentile" else {}), **extra,
    })
    log.info("%s %s: balanced accuracy %.4f (float %.4f, delta %+.2f points)", cfg.stage, cfg.mode,
             metrics["balanced_accuracy"], float_metrics["balanced_accuracy"], metrics["balanced_accuracy_delta"])
    return _write_outputs(quantized_dir(run_dir, cfg.stage), cfg, run_info, source, tensors, folded, metrics)


def _write_outputs(out: Path, cfg: QuantizeConfig, run_info: dict, source: ClassBalancedSource, tensors,
                   folded: nn.Module, metrics: dict) -> QuantizeResult:
    """calibration.json, the tuned weights (or removal of stale ones), then metrics.json as the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # the manifest goes first and comes back last
    weights_path = out / "model.safetensors"
    tuned = (cfg.mode == "qat" or metrics.get("head_refit", {}).get("kept", False)
             or metrics.get("reconstruction", {}).get("kept", False))
    if tuned:
        save_weights(weights_path, folded.state_dict(), {"stage": cfg.stage, "mode": cfg.mode, "folded": "batchnorm"})
    else:
        weights_path.unlink(missing_ok=True)  # stale tuned weights would not match the new ranges
    calibration = Calibration(
        model={"stage": cfg.stage, "img_size": run_info["img_size"], "input_name": INPUT_NAME,
               "backbone": run_info["backbone"], "mode": cfg.mode, "float_modules": metrics["float_modules"],
               "tuned_weights": tuned, **({"tuned_weights_sha256": sha256_file(weights_path)} if tuned else {})},
        method=cfg.method, calibration_files_hash=source.file_list_hash(root=run_info["data_dir"]),
        tensors=tuple(tensors),
    )
    write_calibration(out / "calibration.json", calibration)
    files = [name for name in ("calibration.json", "model.safetensors") if (out / name).is_file()]
    metrics = {
        **metrics, "calibration_files_hash": calibration.calibration_files_hash,
        "calibration_files": [_relative(path, run_info["data_dir"]) for path in source.paths],
        "files": {name: sha256_file(out / name) for name in files},
    }
    atomic_write_json(out / "metrics.json", metrics)
    return QuantizeResult(out / "calibration.json", metrics, weights_path if weights_path.is_file() else None)


def _relative(path: Path, root: str) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def load_quantized_model(run_dir: str | Path, stage: str = "float") -> tuple[nn.Module, dict, Calibration]:
    """(folded float model, run_info, calibration) of RUN_DIR/quantized/<stage>, as the INT8 export loads
    them (:func:`export.stage.load_int8_model`: the files checked against their sha256 first).

    The model is the stage's model with BatchNorm folded, carrying the tuned weights (QAT, or the
    PTQ head refit) when the quantize run wrote them; calibration.json's module names refer to it.
    """
    from export.stage import load_int8_model

    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    check_quantize_outputs(run_dir, stage, require_manifest=True)
    model, run_info = load_stage_model(run_dir, stage)
    folded, calibration, _ = load_int8_model(run_dir, stage, model, int(run_info["img_size"]))
    return folded, run_info, calibration
