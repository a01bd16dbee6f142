"""K-fold cross-validation of the frozen-trunk recipe, and what an escape-budget operating point would cost.

On a few hundred images with a handful of defects per class, one 80/20 split scores a rare class
on 5 or 6 validation images, each worth several points of balanced accuracy. Cross-validation
scores every image once, out of fold, with the trunk features and the head that ``finetune``
uses: the frozen trunk runs once per image view, and each fold only refits the head.

The same out-of-fold logits choose an operating point: the shift subtracted from the ok class's
logit so that at most a given share of defective parts would be passed as good
(:func:`edge_tl.operating_point.ok_logit_shift`). Folded into the head's bias it travels with every
exported artifact.

The top layer, beside :mod:`edge_tl.finetune` (neither imports the other): folds and out-of-fold
logits come from :mod:`edge_tl.out_of_fold`, the settings from :mod:`edge_tl.finetune_config`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json
from edge_tl.backbones import build_model
from edge_tl.device import resolve_device
from edge_tl.errors import ConfigError
from edge_tl.features import cache_features
from edge_tl.finetune_config import FinetuneConfig, validate_inputs
from edge_tl.metrics import classification_metrics
from edge_tl.operating_point import (  # noqa: F401  (SHIFT_CLEARANCE, ok_logit_shift, apply_ok_shift: old import path)
    ESCAPE_BUDGETS,
    SHIFT_CLEARANCE,
    apply_ok_shift,
    ok_logit_shift,
    operating_point,
)
from edge_tl.out_of_fold import (  # noqa: F401  (stratified_folds: old import path)
    DEFAULT_FOLDS,
    check_folds,
    fold_assignment,
    fold_units,
    out_of_fold_logits,
    part_keys,
    stratified_folds,
)

log = logging.getLogger(__name__)

FOLD_METRICS = ("accuracy", "balanced_accuracy", "escape_rate", "false_reject_rate")


def _fold_summary(logits: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, classes, ok_class) -> tuple[list, dict, dict]:
    per_fold = []
    for fold in np.unique(fold_of):
        mask = fold_of == fold
        metrics = classification_metrics(labels[mask], logits[mask].argmax(1), classes, ok_class)
        per_fold.append({"fold": int(fold), "num_samples": int(mask.sum()),
                         **{key: metrics[key] for key in FOLD_METRICS if key in metrics}})
    keys = [key for key in FOLD_METRICS if key in per_fold[0]]
    mean = {key: float(np.mean([row[key] for row in per_fold])) for key in keys}
    std = {key: float(np.std([row[key] for row in per_fold])) for key in keys}
    return per_fold, mean, std


def cross_validate(data_dir: str | Path, cfg=None, folds: int = DEFAULT_FOLDS, out: str | Path | None = None) -> dict:
    """K-fold cross-validation of ``finetune``'s frozen-trunk head on ``data_dir``; writes ``out`` (JSON) if given.

    Returns the pooled out-of-fold metrics (``pooled``: the metrics.json keys over every image), the
    per-fold metrics with their mean and standard deviation, and the misclassified files.
    """
    started = time.perf_counter()
    cfg = cfg or FinetuneConfig()
    if cfg.unfreeze:
        raise ConfigError(f"--unfreeze {cfg.unfreeze}: cross-validation refits the frozen-trunk head only; drop --unfreeze")
    data_dir = Path(data_dir)
    spec, scan = validate_inputs(data_dir, None, cfg, force=False)
    img_size = cfg.resolved_img_size(spec)
    records = sorted(scan.records, key=lambda record: str(record.path))
    labels = np.array([record.label for record in records])
    keys = part_keys(records, cfg.group_pattern)
    check_folds(fold_units(labels, keys, scan.classes), folds, "images" if keys is None else "groups under --group-pattern")
    model = build_model(spec, num_classes=len(scan.classes), img_size=img_size, pretrained=cfg.pretrained,
                        weights=cfg.weights).eval()
    views = cache_features(model.trunk, records, img_size, spec, cfg.augmented_views, cfg.seed,
                           device=resolve_device(cfg.device), crop=cfg.crop, runtime=cfg.trunk_runtime)
    fold_of = fold_assignment(labels, keys, folds, cfg.seed)
    logits = out_of_fold_logits(views, labels, len(scan.classes), fold_of, cfg.head_l2,
                                cfg.epochs * cfg.lbfgs_iterations, cfg.seed)
    predicted = logits.argmax(1)
    per_fold, mean, std = _fold_summary(logits, labels, fold_of, scan.classes, cfg.ok_class)
    result = {
        "format": "edge-tl-cv",
        "version": 1,
        "data_dir": str(data_dir.resolve()),
        "backbone": spec.name,
        "img_size": img_size,
        "crop": cfg.crop,
        "classes": list(scan.classes),
        "ok_class": cfg.ok_class,
        "folds": folds,
        "file_list_hash": data_mod.file_list_hash(records, scan.root),
        "config": asdict(cfg),
        "pooled": classification_metrics(labels, predicted, scan.classes, cfg.ok_class),
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "errors": [{"file": str(records[i].path.relative_to(scan.root)), "true": scan.classes[labels[i]],
                    "predicted": scan.classes[predicted[i]], "fold": int(fold_of[i])}
                   for i in np.flatnonzero(predicted != labels)],
        "seconds_total": time.perf_counter() - started,
    }
    if cfg.ok_class is not None:  # what an escape budget (finetune --max-escape) would cost on this data
        result["operating_points"] = [operating_point(logits, labels, scan.classes, cfg.ok_class, rate)
                                      for rate in ESCAPE_BUDGETS]
    if out is not None:
        atomic_write_json(Path(out), result)
    return result
