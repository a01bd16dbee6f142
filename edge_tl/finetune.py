"""Frozen-trunk fine-tuning with a feature cache, the escape-budget operating point, and evaluation.

A frozen trunk is a fixed function, so its output is computed once per image view and cached:
the plain view plus a few augmented views of every training image. Head epochs then cost a
matrix multiply instead of a trunk pass. With ``unfreeze=K`` the cache holds the activations
entering the last K trunk blocks, and only those blocks, the pool and the head run per epoch.
Trunk BatchNorm statistics stay frozen in every mode (small factory datasets cannot re-estimate
them reliably).

The top layer, beside :mod:`edge_tl.crossval` (neither imports the other): it uses the head's math
(:mod:`edge_tl.head`, :mod:`edge_tl.operating_point`, :mod:`edge_tl.out_of_fold`), the frozen-trunk
passes (:mod:`edge_tl.features`) and the shared settings (:mod:`edge_tl.finetune_config`).
``load_checkpoint``, ``run_records``, ``predict_logits``, ``FinetuneConfig`` and ``validate_inputs``
live in those lower modules and are importable from here as well.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json, save_weights, staged_run_dir
from edge_tl.backbones import BackboneSpec, build_model
from edge_tl.checkpoint import load_checkpoint, run_records  # noqa: F401  (documented here too)
from edge_tl.device import CPU, describe_device, resolve_device
from edge_tl.errors import ConfigError, DatasetError
from edge_tl.features import (
    batched,
    cache_features,
    image_views,
    predict_logits,
    resolve_runtime,
    trunk_features,
)
from edge_tl.finetune_config import FinetuneConfig, validate_inputs
from edge_tl.groups import split_records
from edge_tl.head import Standardize, fold_standardization, lbfgs_epoch
from edge_tl.machine import library_versions
from edge_tl.metrics import classification_metrics, resolve_ok_class
from edge_tl.operating_point import apply_ok_shift, operating_point
from edge_tl.out_of_fold import DEFAULT_FOLDS, fold_assignment, fold_units, out_of_fold_logits, part_keys
from edge_tl.progress import progress_bar
from edge_tl.run_lock import run_lock

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    history: list = field(default_factory=list)
    seconds_total: float = 0.0
    seconds_per_epoch: float = 0.0


def freeze_trunk(model: nn.Module, unfreeze: int) -> list[nn.Parameter]:
    """Freeze trunk weights except the last ``unfreeze`` blocks; return the trainable trunk params."""
    blocks = model.trunk.blocks
    if not 0 <= unfreeze <= len(blocks):
        raise ConfigError(f"--unfreeze {unfreeze} is out of range; this backbone has {len(blocks)} trunk blocks")
    for param in model.trunk.parameters():
        param.requires_grad_(False)
    trainable = []
    for block in list(blocks)[len(blocks) - unfreeze:]:
        for param in block.parameters():
            param.requires_grad_(True)
            trainable.append(param)
    return trainable


def set_train_mode(model: nn.Module) -> None:
    """Head in training mode; the trunk stays in eval mode so BatchNorm statistics never move."""
    model.train()
    model.trunk.eval()


class _TrainableTail(nn.Module):
    """The part of the network that runs per epoch on cached inputs: last K blocks, pool, head."""

    def __init__(self, model: nn.Module, unfreeze: int):
        super().__init__()
        blocks = list(model.trunk.blocks)
        self.blocks = nn.Sequential(*blocks[len(blocks) - unfreeze:])
        self.pool = model.trunk.pool
        self.head = model.head
        self.unfreeze = unfreeze

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        if self.unfreeze:
            cached = self.pool(self.blocks(cached.float()))
        return self.head(cached)


def frozen_prefix(model: nn.Module, unfreeze: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fixed function whose outputs are cached: the trunk up to its last ``unfreeze`` blocks."""
    blocks = list(model.trunk.blocks)
    if unfreeze == 0:
        return model.trunk
    return nn.Sequential(*blocks[: len(blocks) - unfreeze])


def _balanced_accuracy_of(logits: np.ndarray, labels: np.ndarray, classes) -> float:
    return classification_metrics(labels, logits.argmax(1), classes)["balanced_accuracy"]


def _pooled(tail: _TrainableTail, cached: torch.Tensor) -> torch.Tensor:
    if not tail.unfreeze:
        return cached
    return torch.cat([tail.pool(tail.blocks(chunk.float())) for chunk in torch.split(cached, 128)])


def train_head(model: nn.Module, train_records, val_records, classes, spec: BackboneSpec, img_size: int,
               cfg: FinetuneConfig, device: torch.device = CPU) -> tuple[list[dict], float, torch.Tensor | None, int]:
    """Train the head (and the last ``cfg.unfreeze`` blocks); restore the best epoch in place.
    Frozen-trunk passes run on ``device`` (``cfg.device`` resolved by the caller); training on the CPU.

    Cached with a frozen trunk, the head is a class-weighted, L2-regularised logistic regression
    on standardised features, fitted by full-batch L-BFGS over every cached view (an epoch is a
    fixed number of L-BFGS iterations). Uncached, or with unfrozen blocks, training is minibatch
    AdamW; with unfrozen blocks the head starts from that L-BFGS fit (linear probe, then fine-tune).
    Early stopping: after ``cfg.patience`` epochs without a better (validation balanced accuracy, then
    lower validation loss) epoch, training stops and the best epoch's weights are restored.
    Returns the per-epoch history, the mean seconds per training epoch (excluding caching), for a
    cached frozen trunk the cached training features (views, N, D) the head was fitted on (else None),
    and the restored (best) epoch, counted from 1.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trunk_params = freeze_trunk(model, cfg.unfreeze)
    train_labels = np.array([r.label for r in train_records])
    val_labels = np.array([r.label for r in val_records])
    targets = torch.from_numpy(train_labels)
    class_weight = torch.as_tensor(data_mod.class_weights(train_labels, len(classes)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=cfg.label_smoothing)
    tail = _TrainableTail(model, cfg.unfreeze)
    views = cfg.augmented_views + 1

    full_batch = cfg.unfreeze == 0
    prefix = frozen_prefix(model, cfg.unfreeze)

    def train_features(epoch: int) -> torch.Tensor:
        """Pooled features of every view of every training image: (views, N, D)."""
        computed = cache_features(prefix, train_records, img_size, spec, cfg.augmented_views, cfg.seed + epoch,
                                  device=device, crop=cfg.crop, runtime=cfg.trunk_runtime)
        with torch.no_grad():
            return computed if not cfg.unfreeze else torch.stack([_pooled(tail, view) for view in computed])

    if cfg.cache_features:
        train_cache = cache_features(prefix, train_records, img_size, spec, cfg.augmented_views, cfg.seed,
                                     device=device, crop=cfg.crop, runtime=cfg.trunk_runtime)
        val_cache = cache_features(prefix, val_records, img_size, spec, 0, cfg.seed,
                                   description="caching validation features", device=device, crop=cfg.crop,
                                   runtime=cfg.trunk_runtime)[0]
        with torch.no_grad():
            pooled = torch.stack([_pooled(tail, view) for view in train_cache])
    else:
        pooled = None
    standardize = Standardize(pooled[0] if pooled is not None
                               else trunk_features(model, train_records, img_size, spec.mean, spec.std, device=device,
                                                   crop=cfg.crop))
    head_net = nn.Sequential(standardize, model.head)
    probe_targets = targets.repeat(views)
    lbfgs = torch.optim.LBFGS(model.head.parameters(), lr=1.0, max_iter=cfg.lbfgs_iterations,
                              history_size=20, line_search_fn="strong_wolfe")

    def probe_inputs(features: torch.Tensor) -> torch.Tensor:
        return standardize(features.reshape(-1, features.shape[-1]))

    if cfg.unfreeze and cfg.cache_features:  # linear probe first, then fine-tune the unfrozen blocks
        for _ in range(cfg.epochs):
            lbfgs_epoch(model.head, probe_inputs(pooled), probe_targets, class_weight, cfg.head_l2,
                        cfg.label_smoothing, lbfgs)
    if not full_batch:
        groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
        if trunk_params:
            groups.append({"params": trunk_params, "lr": cfg.lr * cfg.unfreeze_lr_ratio})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)

    def val_logits() -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            if cfg.cache_features:
                return torch.cat([head_net(_pooled(tail, chunk)) for chunk in torch.split(val_cache, 256)]).numpy()
            features = trunk_features(model, val_records, img_size, spec.mean, spec.std, device=device, crop=cfg.crop)
            return head_net(features).numpy()

    history, best_state, best_key, best_epoch, stale, epoch_seconds = [], None, None, 0, 0, []
    with progress_bar("training head", total=cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            set_train_mode(model)
            if full_batch:
                if not cfg.cache_features:  # without the cache, the trunk runs again every epoch
                    pooled = train_features(epoch)
                losses = [lbfgs_epoch(model.head, probe_inputs(pooled), probe_targets, class_weight, cfg.head_l2,
                                      cfg.label_smoothing, lbfgs)]
            else:
                losses = []
                for idx in batched(rng.permutation(len(train_records)), cfg.batch_size):
                    if cfg.cache_features:
                        view = torch.from_numpy(rng.integers(0, views, size=len(idx)))
                        features = _pooled(tail, train_cache[view, torch.from_numpy(idx)])
                    else:
                        batch = np.stack([image_views(train_records[i], img_size, spec, 1, rng, cfg.crop)[1] for i in idx])
                        features = model.trunk(torch.from_numpy(batch))
                    loss = loss_fn(head_net(features), targets[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                scheduler.step()
            epoch_seconds.append(time.perf_counter() - start)

            logits = val_logits()
            val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val_labels)))
            bal = _balanced_accuracy_of(logits, val_labels, classes)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
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
    return (history, float(np.mean(epoch_seconds)), (pooled if full_batch and cfg.cache_features else None),
            best_epoch)


def fit_operating_point(model: nn.Module, records, views: torch.Tensor | None, classes, spec, img_size: int, cfg,
                        device: torch.device) -> dict:
    """Choose and apply ``cfg.max_escape``'s ok-logit shift to ``model.head``, measured out of fold on ``records``
    (the training split): each fold's head is fitted like the deployed one on the other folds' ``views``.

    ``views`` are the cached training features the head was fitted on; without them (unfrozen blocks, no
    cache) the fitted trunk's plain view is computed, and the estimate is optimistic: that trunk has
    seen every training image.
    """
    labels = np.array([record.label for record in records])
    if views is None:
        views = trunk_features(model, records, img_size, spec.mean, spec.std, device=device, crop=cfg.crop)[None]
    keys = part_keys(records, cfg.group_pattern)
    folds = int(min(DEFAULT_FOLDS, max(2, min(fold_units(labels, keys, classes).values()))))
    fold_of = fold_assignment(labels, keys, folds, cfg.seed)
    logits = out_of_fold_logits(views, labels, len(classes), fold_of, cfg.head_l2, cfg.epochs * cfg.lbfgs_iterations,
                                cfg.seed)
    point = operating_point(logits, labels, classes, cfg.ok_class, cfg.max_escape)
    apply_ok_shift(model.head, resolve_ok_class(classes, cfg.ok_class), point["ok_logit_shift"])
    log.info("escape budget %.3f: ok logit lowered by %.3f (out of fold on %d training images: escape %.4f, "
             "false reject %.4f)", cfg.max_escape, point["ok_logit_shift"], len(labels), point["escape_rate"],
             point["false_reject_rate"])
    return {**point, "folds": folds, "measured_on": "training split, out of fold"}


def finetune(data_dir: str | Path, out: str | Path, cfg: FinetuneConfig = FinetuneConfig(), force: bool = False) -> FinetuneResult:
    """Fine-tune a pretrained backbone on an ImageFolder; write a run directory (under its lock)."""
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    with run_lock(out):
        spec, scan = validate_inputs(data_dir, out, cfg, force)
        return _finetune(data_dir, out, cfg, force, spec, scan, started)


def _finetune(data_dir: Path, out: Path, cfg: FinetuneConfig, force: bool, spec: BackboneSpec, scan,
              started: float) -> FinetuneResult:
    img_size = cfg.resolved_img_size(spec)
    train, val = split_records(scan.records, cfg.val_fraction, cfg.seed, cfg.group_pattern, scan.classes)
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
               "best_epoch": best_epoch, "epochs_run": len(history)}
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
        "operating_point": point,
        "history": history,
        "versions": library_versions("torchvision", "timm", "onnxruntime"),
    }
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
