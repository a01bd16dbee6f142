"""Frozen-trunk fine-tuning with a feature cache, the escape-budget operating point, and evaluation.

A frozen trunk is a fixed function, so its output is computed once per image view and cached:
the plain view plus a few augmented views of every training image. Head epochs then cost a
matrix multiply instead of a trunk pass. With ``unfreeze=K`` the cache holds the activations
entering the last K trunk blocks, and only those blocks, the pool and the head run per epoch
(:mod:`edge_tl.tail`: a linear probe, then L2-SP toward the pretrained weights, early stopping on an
inner split of the training data). Trunk BatchNorm statistics stay frozen in every mode (small factory datasets cannot re-estimate
them reliably).

The top layer, beside :mod:`edge_tl.crossval` (neither imports the other): it uses the head's math
(:mod:`edge_tl.head`, :mod:`edge_tl.operating_point`, :mod:`edge_tl.out_of_fold`), the frozen-trunk
passes (:mod:`edge_tl.features`) and the shared settings (:mod:`edge_tl.finetune_config`).
``load_checkpoint``, ``run_records``, ``predict_logits``, ``FinetuneConfig`` and ``validate_inputs``
live in those lower modules and are importable from here as well.

Started by torchrun (``torchrun --nproc-per-node N -m edge_tl finetune ...``), :func:`finetune`
runs data-parallel (:mod:`edge_tl.distributed`): every rank computes the same run from its shards,
rank 0 alone holds the run directory's lock and writes it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json, save_weights, staged_run_dir
from edge_tl.backbones import BackboneSpec, build_model
from edge_tl.checkpoint import load_checkpoint, run_records  # noqa: F401  (documented here too)
from edge_tl.device import CPU, describe_device, resolve_device
from edge_tl.distributed import checked_on_every_rank, is_main_process, process_group
from edge_tl.errors import DatasetError
from edge_tl.features import cache_features, predict_logits, resolve_runtime, trunk_features
from edge_tl.finetune_config import FinetuneConfig, validate_inputs
from edge_tl.groups import split_records
from edge_tl.head import Standardize, fold_standardization, lbfgs_epoch
from edge_tl.machine import library_versions
from edge_tl.metrics import classification_metrics, resolve_ok_class
from edge_tl.operating_point import apply_ok_shift
from edge_tl.out_of_fold import escape_budget_point, part_keys
from edge_tl.progress import progress_bar
from edge_tl.run_lock import run_lock
from edge_tl.tail import (  # noqa: F401  (frozen_prefix, TrainableTail: documented here too)
    TrainableTail,
    freeze_trunk,
    frozen_prefix,
    inner_split,
    set_train_mode,
    train_tail,
)

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    history: list = field(default_factory=list)
    seconds_total: float = 0.0
    seconds_per_epoch: float = 0.0


def _balanced_accuracy_of(logits: np.ndarray, labels: np.ndarray, classes) -> float:
    return classification_metrics(labels, logits.argmax(1), classes)["balanced_accuracy"]


def train_head(model: nn.Module, train_records, val_records, classes, spec: BackboneSpec, img_size: int,
               cfg: FinetuneConfig, device: torch.device = CPU) -> tuple[list[dict], float, torch.Tensor | None, int]:
    """Train the head (and with ``cfg.unfreeze`` the last K blocks: :func:`train_unfrozen_tail`); restore
    the best epoch in place. Frozen-trunk passes run on ``device`` (``cfg.device`` resolved by the caller).

    Frozen trunk: the head is a class-weighted, L2-regularised logistic regression on standardised
    features, fitted by full-batch L-BFGS over every cached view (an epoch is a fixed number of L-BFGS
    iterations; without the cache the trunk runs again every epoch). Early stopping: after
    ``cfg.patience`` epochs without a better (validation balanced accuracy, then lower validation loss)
    epoch, training stops and the best epoch's weights are restored.
    Returns the per-epoch history, the mean seconds per training epoch (excluding caching), for a
    cached frozen trunk the cached training features (views, N, D) the head was fitted on (else None),
    and the restored (best) epoch.
    """
    if cfg.unfreeze:
        return train_unfrozen_tail(model, train_records, classes, spec, img_size, cfg, device)
    torch.manual_seed(cfg.seed)
    freeze_trunk(model, 0)
    train_labels = np.array([r.label for r in train_records])
    val_labels = np.array([r.label for r in val_records])
    targets = torch.from_numpy(train_labels)
    class_weight = torch.as_tensor(data_mod.class_weights(train_labels, len(classes)), dtype=torch.float32)
    views = cfg.augmented_views + 1

    def train_features(epoch: int) -> torch.Tensor:
        """Pooled features of every view of every training image: (views, N, D)."""
        return cache_features(model.trunk, train_records, img_size, spec, cfg.augmented_views, cfg.seed + epoch,
                              device=device, crop=cfg.crop, runtime=cfg.trunk_runtime)

    if cfg.cache_features:
        pooled = train_features(0)
        val_cache = cache_features(model.trunk, val_records, img_size, spec, 0, cfg.seed,
                                   description="caching validation features", device=device, crop=cfg.crop,
                                   runtime=cfg.trunk_runtime)[0]
    standardize = Standardize(pooled[0] if cfg.cache_features
                              else trunk_features(model, train_records, img_size, spec.mean, spec.std, device=device,
                                                  crop=cfg.crop))
    head_net = nn.Sequential(standardize, model.head)
    probe_targets = targets.repeat(views)
    lbfgs = torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=cfg.lbfgs_iterations,
                              history_size=20, line_search_fn="strong_wolfe")

    def val_logits() -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            features = val_cache if cfg.cache_features else trunk_features(
                model, val_records, img_size, spec.mean, spec.std, device=device, crop=cfg.crop)
            return head_net(features).numpy()

    history, best_state, best_key, best_epoch, stale, epoch_seconds = [], None, None, 0, 0, []
    with progress_bar("training head", total=cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            set_train_mode(model)
            if not cfg.cache_features:  # without the cache, the trunk runs again every epoch
                pooled = train_features(epoch)
            loss = lbfgs_epoch(model.head, standardize(pooled.reshape(-1, pooled.shape[-1])), probe_targets,
                               class_weight, cfg.head_l2, cfg.label_smoothing, lbfgs)
            epoch_seconds.append(time.perf_counter() - start)

            logits = val_logits()
            val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val_labels)))
            bal = _balanced_accuracy_of(logits, val_labels, classes)
            history.append({"epoch": epoch + 1, "train_loss": loss, "val_loss": val_loss,
                            "val_balanced_accuracy": bal})
            key = (bal, -val_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            advance(1)
            if stale >= cfg.patience:
                log.info("early stopping after epoch %d (best: epoch %d, balanced accuracy %.4f)", epoch + 1,
                         best_epoch, best_key[0])
                break
    model.load_state_dict(best_state)
    fold_standardization(model.head, standardize)
    model.eval()
    return history, float(np.mean(epoch_seconds)), (pooled if cfg.cache_features else None), best_epoch


def train_unfrozen_tail(model: nn.Module, train_records, classes, spec: BackboneSpec, img_size: int,
                        cfg: FinetuneConfig, device: torch.device = CPU) -> tuple[list[dict], float, torch.Tensor, int]:
    """The last ``cfg.unfreeze`` blocks and the head by :func:`edge_tl.tail.train_tail` (linear probe, then
    L2-SP), on the frozen prefix's cached views of ``train_records``, in place. Early stopping watches an
    inner split of ``train_records`` (``cfg.val_fraction`` of it, whole parts under ``cfg.group_pattern``),
    never the validation split the run reports on. Returns like :func:`train_head` (history from epoch 0,
    the linear probe); the views are the trained tail's plain-view features of ``train_records``, the ones its
    head was refitted on (an escape budget chosen on them is optimistic: the tail has seen those images)."""
    freeze_trunk(model, cfg.unfreeze)
    labels = np.array([r.label for r in train_records])
    fit, stop = inner_split(labels, part_keys(train_records, cfg.group_pattern), cfg.val_fraction, cfg.seed)
    cache = cache_features(frozen_prefix(model, cfg.unfreeze), train_records, img_size, spec, cfg.augmented_views,
                           cfg.seed, device=device, crop=cfg.crop, runtime=cfg.trunk_runtime)
    fitted = train_tail(TrainableTail(model, cfg.unfreeze), cache, labels, fit, stop, classes, cfg, device)
    model.eval()
    return fitted.history, fitted.seconds_per_epoch, fitted.train_features[:1], fitted.best_epoch


def fit_operating_point(model: nn.Module, records, views: torch.Tensor | None, classes, spec, img_size: int, cfg,
                        device: torch.device) -> dict:
    """Choose and apply ``cfg.max_escape``'s ok-logit shift to ``model.head``, measured out of fold on ``records``
    (the training split): each fold's head is fitted like the deployed one on the other folds' ``views``.

    ``views`` are the cached training features the head was fitted on: every view for the frozen trunk, the
    trained tail's plain view with unfrozen blocks (optimistic: that tail has seen every training image);
    without them (``--no-cache``) the trunk's plain view is computed.
    """
    labels = np.array([record.label for record in records])
    if views is None:
        views = trunk_features(model, records, img_size, spec.mean, spec.std, device=device, crop=cfg.crop)[None]
    point = escape_budget_point(views, labels, part_keys(records, cfg.group_pattern), classes, cfg)
    apply_ok_shift(model.head, resolve_ok_class(classes, cfg.ok_class), point["ok_logit_shift"])
    log.info("escape budget %.3f: ok logit lowered by %.3f (out of fold on %d training images: escape %.4f, "
             "false reject %.4f)", cfg.max_escape, point["ok_logit_shift"], len(labels), point["escape_rate"],
             point["false_reject_rate"])
    return {**point, "measured_on": "training split, out of fold"}


def finetune(data_dir: str | Path, out: str | Path, cfg: FinetuneConfig = FinetuneConfig(), force: bool = False) -> FinetuneResult:
    """Fine-tune a pretrained backbone on an ImageFolder; write a run directory (under its lock).

    Under torchrun every rank checks the inputs and computes; rank 0 alone locks, checks and writes ``out``
    (a failed check on any rank stops every rank with that error), the others write nothing.
    """
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    with process_group(resolve_device(cfg.device)) as (rank, world), contextlib.ExitStack() as held:
        def check():
            if is_main_process():
                held.enter_context(run_lock(out))
            return validate_inputs(data_dir, out if is_main_process() else None, cfg, force)

        spec, scan = checked_on_every_rank(check)
        if world > 1:
            log.info("finetune: rank %d of %d (%s)", rank, world, "writes the run" if rank == 0 else "writes nothing")
        return _finetune(data_dir, out, cfg, force, spec, scan, started, world)


def _finetune(data_dir: Path, out: Path, cfg: FinetuneConfig, force: bool, spec: BackboneSpec, scan,
              started: float, world_size: int = 1) -> FinetuneResult:
    img_size = cfg.resolved_img_size(spec)
    train, val = split_records(scan.records, cfg.val_fraction, cfg.seed, cfg.group_pattern, scan.classes)
    torch.manual_seed(cfg.seed)  # the new head's initial weights: the same in every run and on every torchrun rank
    model = build_model(spec, num_classes=len(scan.classes), img_size=img_size, pretrained=cfg.pretrained,
                        weights=cfg.weights)
    device = resolve_device(cfg.device)
    history, seconds_per_epoch, train_views, best_epoch = train_head(model, train, val, scan.classes, spec, img_size,
                                                                     cfg, device)
    point = None
    if cfg.max_escape is not None:
        point = fit_operating_point(model, train, train_views, scan.classes, spec, img_size, cfg, device)
    logits = predict_logits(model, val, img_size, spec.mean, spec.std, description="evaluating", device=device,
                            crop=cfg.crop)
    metrics = {**classification_metrics([r.label for r in val], logits.argmax(1), scan.classes, cfg.ok_class),
               "best_epoch": best_epoch, "epochs_run": history[-1]["epoch"]}
    run_info = {
        "format": "edge-tl-run",
        "version": 1,
        "backbone": spec.name,
        "img_size": img_size,
        "classes": list(scan.classes),
        "ok_class": cfg.ok_class,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "crop": cfg.crop,
        "channel_order": "RGB",
        "layout": "NCHW",
        "data_dir": str(data_dir.resolve()),
        "class_counts": scan.counts(),
        "split": {
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "group_pattern": cfg.group_pattern,
            "train_files": [str(r.path.relative_to(scan.root)) for r in train],
            "val_files": [str(r.path.relative_to(scan.root)) for r in val],
            "train_hash": data_mod.file_list_hash(train, scan.root),
            "val_hash": data_mod.file_list_hash(val, scan.root),
        },
        "skipped_files": [str(path) for path, _ in scan.skipped],
        "config": asdict(cfg),
        "trunk_device": describe_device(device),
        "trunk_runtime": resolve_runtime(cfg.trunk_runtime, device),
        "world_size": world_size,  # processes that computed the run (torchrun ranks; 1: one process)
        "operating_point": point,
        "history": history,
        "versions": library_versions("torchvision", "timm", "onnxruntime"),
    }
    if is_main_process():
        with staged_run_dir(out, force) as staging:
            save_weights(staging / "model.safetensors", model.state_dict(), {"backbone": spec.name})
            atomic_write_json(staging / "metrics.json", metrics)
            atomic_write_json(staging / "run.json", run_info)
    return FinetuneResult(out, metrics, history, time.perf_counter() - started, seconds_per_epoch)


def evaluate(run_dir: str | Path, data_dir: str | Path, out: str | Path | None = None, device: str = "auto") -> dict:
    """Metrics of a fine-tuned run on another folder with the same classes (predictions on ``device``);
    writes ``out`` (default RUN_DIR/evaluation.json) under the run's lock."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _evaluate(run_dir, data_dir, out, device)


def _evaluate(run_dir: Path, data_dir: str | Path, out: str | Path | None, device: str) -> dict:
    torch_device = resolve_device(device)
    model, run_info = load_checkpoint(run_dir)
    scan = data_mod.scan_image_folder(data_dir)
    if list(scan.classes) != list(run_info["classes"]):
        raise DatasetError(
            f"{data_dir} has classes {', '.join(scan.classes)} but the run was trained on "
            f"{', '.join(run_info['classes'])}; evaluate on a folder with the same class folders"
        )
    logits = predict_logits(model, scan.records, run_info["img_size"], run_info["mean"], run_info["std"],
                            device=torch_device, crop=data_mod.run_crop(run_info))
    metrics = classification_metrics([r.label for r in scan.records], logits.argmax(1), scan.classes,
                                     run_info.get("ok_class"))
    atomic_write_json(Path(out) if out else run_dir / "evaluation.json", metrics)
    return metrics
