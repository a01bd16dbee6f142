"""The prune stage of a run directory: parent checkpoint -> RUN_DIR/pruned/ (spec, weights, metrics).

`edge_tl.prune` owns NNI and the model surgery; this module turns a fine-tuned run into a pruned
artifact, recovers its accuracy, measures it against the parent and writes it atomically.
"""
from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json, load_weights, read_json, save_weights
from edge_tl.backbones import build_model
from edge_tl.errors import AccuracyRegressionError, ArtifactError, ConfigError
from edge_tl.checkpoint import load_checkpoint, run_records
from edge_tl.head_refit import refit_head
from edge_tl.metrics import classification_metrics
from edge_tl.model_cost import count_macs, count_params, ort_latency_ms
from edge_tl.recovery import recover
from edge_tl.run_lock import run_lock

log = logging.getLogger(__name__)

PRUNED_DIR = "pruned"


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.5
    method: str = "contribution"
    align: int = 8
    recover_epochs: int = 3  # each epoch at 224 px costs minutes on 2 cores; the run has a 25-minute budget
    distill: bool = True
    lr: float = 1e-4
    batch_size: int = 32
    calibration_images: int = 128  # re-solving the trunk on magnetic-tile: 64 images 0.908, 128 0.926, 512 0.929 (noise)
    latency_runs: int = 50
    require_speedup: bool = False
    refit_head: bool = True  # refit the head on the pruned trunk's features before recovery
    seed: int = 0


@dataclass(frozen=True)
class PruneResult:
    pruned_dir: Path
    metrics: dict
    faster_than_parent: bool


def validate_config(cfg: PruneConfig) -> None:
    from edge_tl.prune import METHODS

    if cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method!r} is unknown; choose one of {', '.join(METHODS)}")
    if not 0.0 < cfg.sparsity < 1.0:
        raise ConfigError(f"--sparsity {cfg.sparsity} must lie strictly between 0 and 1")
    if cfg.align < 1:
        raise ConfigError(f"--align {cfg.align} must be a positive channel count (8 suits most runtimes)")
    if cfg.recover_epochs < 0:
        raise ConfigError(f"--recover-epochs {cfg.recover_epochs} must be 0 or more")


def _batches(records, run_info: dict, batch_size: int, rng: np.random.Generator | None):
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = data_mod.load_tensor_batch(chunk, run_info["img_size"], run_info["mean"], run_info["std"], rng,
                                            crop=data_mod.run_crop(run_info))
        yield torch.from_numpy(images), torch.tensor([r.label for r in chunk])


def _predict(model: nn.Module, val_images: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in torch.split(val_images, 64)]).argmax(1).numpy()


@dataclass
class _StageData:
    """What pruning and the sweep read from a fine-tuned run: the parent, the splits, the validation
    tensors and the seeded calibration subset of the training split (``rng`` continues after it)."""

    parent: nn.Module
    run_info: dict
    train: list
    val_images: torch.Tensor
    val_labels: np.ndarray
    calibration: list
    calibration_batches: list
    rng: np.random.Generator

    @classmethod
    def load(cls, run_dir: Path, cfg: PruneConfig) -> "_StageData":
        parent, run_info = load_checkpoint(run_dir)
        train, val = run_records(run_info, "train"), run_records(run_info, "val")
        val_images = torch.cat([images for images, _ in _batches(val, run_info, 64, None)])
        rng = np.random.default_rng(cfg.seed)
        calibration = [train[i] for i in rng.permutation(len(train))[: cfg.calibration_images]]
        calibration_batches = [images for images, _ in _batches(calibration, run_info, cfg.batch_size, None)]
        return cls(parent, run_info, train, val_images, np.array([r.label for r in val]), calibration,
                   calibration_batches, rng)

    def evaluate(self, model: nn.Module) -> dict:
        """Validation balanced accuracy, as the ``evaluate`` callback of :func:`refit_head` wants it."""
        predictions = _predict(model, self.val_images)
        return {"balanced_accuracy": classification_metrics(self.val_labels, predictions,
                                                            self.run_info["classes"])["balanced_accuracy"]}


def prune_run(run_dir: str | Path, cfg: PruneConfig = PruneConfig()) -> PruneResult:
    """Prune a fine-tuned run, recover accuracy with distillation, and write RUN_DIR/pruned/ (under the run's
    lock). With ``cfg.require_speedup`` a pruned model no faster than its parent is an error and is not written."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _prune_run(run_dir, cfg)


def _prune_run(run_dir: Path, cfg: PruneConfig) -> PruneResult:
    from edge_tl import prune as prune_mod

    run = _StageData.load(run_dir, cfg)
    parent, run_info, train, rng = run.parent, run.run_info, run.train, run.rng
    img_size, classes = run_info["img_size"], run_info["classes"]
    val_images, val_labels = run.val_images, run.val_labels
    torch.manual_seed(cfg.seed)

    def balanced_accuracy(model: nn.Module) -> float:
        return run.evaluate(model)["balanced_accuracy"]

    training_batches = list(_batches(run.calibration, run_info, cfg.batch_size, None)) if cfg.method == "taylor" else None
    pruned, spec = prune_mod.prune_model(parent, img_size, cfg.sparsity, cfg.method, cfg.align,
                                         calibration_batches=run.calibration_batches, training_batches=training_batches)

    head_refit = None
    if cfg.refit_head:
        _, head_refit = refit_head(pruned, run_info, run.evaluate, run.evaluate(pruned))

    def train_loader():
        order = [train[i] for i in rng.permutation(len(train))]
        return _batches(order, run_info, cfg.batch_size, rng)

    recovery = recover(pruned, parent if cfg.distill else None, train_loader, balanced_accuracy,
                       cfg.recover_epochs, cfg.lr, distill=cfg.distill)

    parent_metrics = classification_metrics(val_labels, _predict(parent, val_images), classes, run_info.get("ok_class"))
    metrics = classification_metrics(val_labels, _predict(pruned, val_images), classes, run_info.get("ok_class"))
    parent_macs, macs = count_macs(parent, img_size), count_macs(pruned, img_size)
    parent_latency = ort_latency_ms(parent, img_size, cfg.latency_runs)
    latency = ort_latency_ms(pruned, img_size, cfg.latency_runs)
    metrics.update({
        "params": count_params(pruned), "parent_params": count_params(parent),
        "macs": macs, "parent_macs": parent_macs, "macs_ratio": parent_macs / macs,
        "ort_latency_ms": latency, "parent_ort_latency_ms": parent_latency,
        "ort_latency_ratio": parent_latency / latency,
        "parent_balanced_accuracy": parent_metrics["balanced_accuracy"],
        "balanced_accuracy_delta": 100.0 * (metrics["balanced_accuracy"] - parent_metrics["balanced_accuracy"]),
        "faster_than_parent": latency < parent_latency,
        "head_refit": head_refit,
        "recovery": recovery,
        "config": asdict(cfg),
    })
    if "escape_rate" in metrics:
        metrics["escape_rate_delta"] = 100.0 * (metrics["escape_rate"] - parent_metrics["escape_rate"])
    spec = {**spec, "backbone": run_info["backbone"], "img_size": img_size, "num_classes": len(classes)}

    faster = metrics["faster_than_parent"]
    if not faster:
        message = (f"pruned model is not faster than its parent in ONNX Runtime ({latency:.2f} ms vs "
                   f"{parent_latency:.2f} ms); try another --sparsity or `edge-tl prune RUN_DIR --sweep`")
        if cfg.require_speedup:  # the slower model is never written
            raise AccuracyRegressionError(f"{message}; nothing was written (--require-speedup)")
        log.warning(message)
    out = run_dir / PRUNED_DIR
    staging = Path(tempfile.mkdtemp(prefix=".pruned.", suffix=".partial", dir=run_dir))
    try:
        save_weights(staging / "model.safetensors", pruned.state_dict(), {"stage": "pruned"})
        atomic_write_json(staging / "shape.json", spec)
        atomic_write_json(staging / "metrics.json", metrics)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PruneResult(out, metrics, faster)


def load_pruned(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the pruned model of a run from RUN_DIR/pruned/shape.json and model.safetensors."""
    from edge_tl.prune import apply_shape_spec

    run_dir = Path(run_dir)
    pruned_dir = run_dir / PRUNED_DIR
    if not (pruned_dir / "shape.json").is_file():
        raise ArtifactError(f"{pruned_dir} has no pruned model; run `edge-tl prune {run_dir}` first")
    run_info = read_json(run_dir / "run.json")
    spec = read_json(pruned_dir / "shape.json")
    model = build_model(run_info["backbone"], num_classes=len(run_info["classes"]), img_size=run_info["img_size"],
                        pretrained=False)
    apply_shape_spec(model, spec)
    model.load_state_dict(load_weights(pruned_dir / "model.safetensors"), strict=True)
    return model.eval(), run_info


def load_stage_model(run_dir: str | Path, stage: str) -> tuple[nn.Module, dict]:
    """The float (fine-tuned) or pruned model of a run."""
    if stage == "float":
        return load_checkpoint(run_dir)
    if stage == "pruned":
        return load_pruned(run_dir)
    raise ConfigError(f"--stage {stage!r} is unknown; choose float or pruned")


def sweep_run(run_dir: str | Path, cfg: PruneConfig = PruneConfig(),
              sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)) -> dict:
    """Accuracy (after the head refit, no recovery), MACs and latency per trunk stage and sparsity
    -> RUN_DIR/pruned_sweep.json (under the run's lock)."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _sweep_run(run_dir, cfg, sparsities)


def _sweep_run(run_dir: Path, cfg: PruneConfig, sparsities: tuple[float, ...]) -> dict:
    from edge_tl.prune_sweep import sweep

    run = _StageData.load(run_dir, cfg)

    def accuracy(model: nn.Module) -> float | dict[str, float]:
        # as `edge-tl prune` does before recovery: the head refit on the pruned trunk, kept if not worse
        before = run.evaluate(model)
        if not cfg.refit_head or model is run.parent:
            return before["balanced_accuracy"]
        after = refit_head(copy.deepcopy(model), run.run_info, run.evaluate, before)[0]["balanced_accuracy"]
        return {"balanced_accuracy": after, "balanced_accuracy_before_refit": before["balanced_accuracy"]}

    result = sweep(run.parent, run.run_info["img_size"], accuracy, sparsities=sparsities, method=cfg.method,
                   align=cfg.align, calibration_batches=run.calibration_batches, latency_runs=cfg.latency_runs)
    atomic_write_json(run_dir / "pruned_sweep.json", result)
    return result
