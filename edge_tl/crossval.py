"""K-fold cross-validation of the frozen-trunk recipe, and the escape-budget operating point.

On a few hundred images with a handful of defects per class, one 80/20 split scores a rare class
on 5 or 6 validation images, each worth several points of balanced accuracy. Cross-validation
scores every image once, out of fold, with the trunk features and the head that ``finetune``
uses: the frozen trunk runs once per image view, and each fold only refits the head.

The same out-of-fold logits choose an operating point: the shift subtracted from the ok class's
logit so that at most a given share of defective parts would be passed as good
(:func:`ok_logit_shift`). Folded into the head's bias it travels with every exported artifact.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json
from edge_tl.backbones import build_model
from edge_tl.device import resolve_device
from edge_tl.errors import ConfigError
from edge_tl.features import cache_features
from edge_tl.groups import group_folds, group_keys, groups_per_class
from edge_tl.head import fit_linear_head
from edge_tl.metrics import classification_metrics, resolve_ok_class

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
SHIFT_CLEARANCE = 1e-4  # logit units added to the chosen margin; far above float32 round-off of the bias
ESCAPE_BUDGETS = (0.0, 0.01, 0.02, 0.05)
FOLD_METRICS = ("accuracy", "balanced_accuracy", "escape_rate", "false_reject_rate")


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold index per sample: each class shuffled (seeded) and dealt round-robin over the folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        assignment[members[rng.permutation(len(members))]] = np.arange(len(members)) % folds
    return assignment


def check_folds(counts: dict[str, int], folds: int, unit: str = "images") -> None:
    """Every class must appear in every fold: a user error otherwise, before any trunk pass. ``counts``:
    images (or groups, ``unit``) per class."""
    if folds < 2:
        raise ConfigError(f"--folds {folds} must be at least 2; use e.g. --folds 5")
    smallest = min(counts, key=counts.get)
    if counts[smallest] < folds:
        raise ConfigError(f"class {smallest} has {counts[smallest]} {unit}, fewer than --folds {folds}; "
                          f"lower --folds to {max(counts[smallest], 2)} or add images")


def part_keys(records, group_pattern: str | None) -> list[str] | None:
    """Each record's part (:func:`edge_tl.groups.group_keys`), or None without a group pattern."""
    return None if group_pattern is None else group_keys([record.path for record in records], group_pattern)


def fold_units(labels: np.ndarray, keys: list[str] | None, classes) -> dict[str, int]:
    """What folds are dealt per class: its images, or with part keys its parts."""
    return groups_per_class(labels, range(len(labels)) if keys is None else keys, classes)


def fold_assignment(labels: np.ndarray, keys: list[str] | None, folds: int, seed: int) -> np.ndarray:
    """:func:`stratified_folds`, or with part keys whole parts per fold (:mod:`edge_tl.groups`)."""
    if keys is None:
        return stratified_folds(labels, folds, seed)
    return group_folds(labels, keys, folds, seed)


@torch.no_grad()
def out_of_fold_logits(views: torch.Tensor, labels: np.ndarray, num_classes: int, fold_of: np.ndarray, l2: float,
                       iterations: int, seed: int = 0) -> np.ndarray:
    """Logits of every sample's plain view (``views[0]``) from a head fitted on the other folds.

    ``views`` is (views, N, D): view 0 the plain view, the rest augmented views, as fine-tuning caches
    them. Each fold's head is :func:`fit_linear_head` on all views of the other folds, standardised
    on their plain view, like the head fine-tuning deploys.
    """
    labels = np.asarray(labels)
    logits = np.zeros((len(labels), num_classes), dtype=np.float32)
    for fold in np.unique(fold_of):
        train = torch.from_numpy(fold_of != fold)
        train_views = views[:, train]
        with torch.enable_grad():
            head = fit_linear_head(train_views.reshape(-1, views.shape[-1]), np.tile(labels[train.numpy()], len(views)),
                                   num_classes, l2, iterations, seed, statistics=train_views[0])
        logits[~train.numpy()] = head(views[0, ~train].float()).numpy()
    return logits


def ok_logit_shift(logits: np.ndarray, labels: np.ndarray, ok_index: int, max_escape: float) -> float:
    """The smallest shift s >= 0 such that, with the ok logit lowered by s, at most ``max_escape`` of the
    defective samples are still predicted ok (the margin of the first sample to stop is cleared by SHIFT_CLEARANCE)."""
    defective = np.asarray(labels) != ok_index
    if not defective.any():
        return 0.0
    others = np.delete(logits[defective], ok_index, axis=1).max(1)
    margins = np.sort(logits[defective, ok_index] - others)[::-1]  # > 0: passed as good
    allowed = math.floor(max_escape * len(margins) + 1e-9)
    if allowed >= len(margins):
        return 0.0
    # just past the margin: the sample on it is then decided for the defect (ties would go to argmax's order)
    return float(max(0.0, margins[allowed] + SHIFT_CLEARANCE))


def operating_point(logits: np.ndarray, labels: np.ndarray, classes, ok_class: str, max_escape: float) -> dict:
    """The ok-logit shift for an escape budget and what it costs, measured on the same (out-of-fold) logits."""
    ok_index = resolve_ok_class(classes, ok_class)
    shift = ok_logit_shift(logits, labels, ok_index, max_escape)
    shifted = logits.copy()
    shifted[:, ok_index] -= shift
    metrics = classification_metrics(labels, shifted.argmax(1), classes, ok_class)
    return {"max_escape": max_escape, "ok_logit_shift": shift,
            **{key: metrics[key] for key in ("balanced_accuracy", "escape_rate", "false_reject_rate")}}


def apply_ok_shift(head: nn.Linear, ok_index: int, shift: float) -> None:
    """Lower the ok class's bias by ``shift``: the operating point becomes part of the deployed weights."""
    with torch.no_grad():
        head.bias[ok_index] -= shift


def fit_operating_point(model: nn.Module, records, views: torch.Tensor | None, classes, spec, img_size: int, cfg,
                        device: torch.device) -> dict:
    """Choose and apply ``cfg.max_escape``'s ok-logit shift to ``model.head``, measured out of fold on ``records``
    (the training split): each fold's head is fitted like the deployed one on the other folds' ``views``.

    ``views`` are the cached training features the head was fitted on; without them (unfrozen blocks, no
    cache) the fitted trunk's plain view is computed, and the estimate is optimistic: that trunk has
    seen every training image.
    """
    from edge_tl.head import trunk_features

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
    from edge_tl.finetune import FinetuneConfig, validate_inputs

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
