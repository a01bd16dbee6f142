"""K-fold cross-validation of the frozen-trunk recipe, and what an escape-budget operating point would cost.

On a few hundred images with a handful of defects per class, one 80/20 split scores a rare class
on 5 or 6 validation images, each worth several points of balanced accuracy. Cross-validation
scores every image once, out of fold, with the trunk features and the head that ``finetune``
uses: the frozen trunk runs once per image view, and each fold only refits the head. With
``unfreeze=K`` the cache holds the frozen prefix's activations and each fold trains its own tail
(:mod:`edge_tl.tail`), stopping early on an inner split of its own training images, never on the
fold it is scored on; :func:`cross_validate_recipes` scores several recipes on the same folds.

The same out-of-fold logits show what an operating point would cost: the shift subtracted from the
ok class's logit so that at most a given share of defective parts would be passed as good
(:func:`edge_tl.operating_point.ok_logit_shift`; ``operating_points``, chosen on the scored logits
themselves). A recipe with an escape budget (``max_escape``) is scored as ``finetune`` deploys it:
each fold chooses its own shift out of fold on its training images alone (inner folds,
:func:`edge_tl.out_of_fold.escape_budget_point`) and applies it to the fold it scores, so the
pooled metrics are those of the shifted decisions (``escape_budget``). Folded into the head's bias
the shift travels with every exported artifact.

Started by torchrun (``torchrun --nproc-per-node N -m edge_tl cv ...``), the frozen passes and the
tails run data-parallel (:mod:`edge_tl.distributed`); every rank gets the same results, rank 0
alone writes ``out``.

The top layer, beside :mod:`edge_tl.finetune` (neither imports the other): folds and out-of-fold
logits come from :mod:`edge_tl.out_of_fold`, the settings from :mod:`edge_tl.finetune_config`.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import atomic_write_json
from edge_tl.backbones import build_model
from edge_tl.device import CPU, resolve_device
from edge_tl.distributed import is_main_process, process_group
from edge_tl.errors import ConfigError
from edge_tl.features import cache_features
from edge_tl.finetune_config import FinetuneConfig, validate_inputs
from edge_tl.metrics import classification_metrics, resolve_ok_class
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
    escape_budget_point,
    fold_assignment,
    fold_units,
    out_of_fold_logits,
    part_keys,
    stratified_folds,
)

from edge_tl.tail import TrainableTail, freeze_trunk, frozen_prefix, inner_split, tail_logits, train_tail

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
    """K-fold cross-validation of ``finetune``'s recipe on ``data_dir``; writes ``out`` (JSON) if given.

    Returns the pooled out-of-fold metrics (``pooled``: the metrics.json keys over every image), the
    per-fold metrics with their mean and standard deviation, and the misclassified files. With
    ``cfg.unfreeze`` each fold trains its own tail (:func:`edge_tl.tail.train_tail`, early stopping
    on an inner split of that fold's training images) on one shared cache of the frozen prefix.
    """
    result = cross_validate_recipes(data_dir, [cfg or FinetuneConfig()], folds)[0]
    if out is not None and is_main_process():  # under torchrun rank 0 writes
        atomic_write_json(Path(out), result)
    return result


FOLD_SETTINGS = ("seed", "group_pattern", "ok_class", "strict")  # what every recipe of one comparison shares
CACHE_SETTINGS = ("backbone", "img_size", "crop", "augmented_views", "seed", "weights", "pretrained", "device",
                  "trunk_runtime")  # recipes agreeing on these share one cache of the frozen prefix


def cross_validate_recipes(data_dir: str | Path, recipes: list, folds: int = DEFAULT_FOLDS) -> list[dict]:
    """:func:`cross_validate` of every recipe (a FinetuneConfig) on the same folds of ``data_dir``.

    Each group of recipes with the same input settings (``CACHE_SETTINGS``) shares one cache: the
    frozen prefix before the largest ``unfreeze`` among them, run once per image view; a recipe that
    unfreezes fewer blocks runs the remaining frozen blocks on that cache. Every result records its
    own ``seconds_total``: its share of the cache passes plus its own fitting. Under torchrun every rank
    computes its shards inside one process group (NCCL when every recipe's device is a GPU, else gloo)
    and returns the same results.
    """
    data_dir = Path(data_dir)
    if not recipes:
        raise ConfigError("no recipe to cross-validate; give at least one")
    for cfg in recipes[1:]:
        differing = [key for key in FOLD_SETTINGS if getattr(cfg, key) != getattr(recipes[0], key)]
        if differing:
            raise ConfigError(f"recipes compared on the same folds must share {', '.join(FOLD_SETTINGS)}; one sets "
                              f"{differing[0]}={getattr(cfg, differing[0])!r}: set it on the command line instead")
    checked = [validate_inputs(data_dir, None, cfg, force=False) for cfg in recipes]
    scan = checked[0][1]
    records = sorted(scan.records, key=lambda record: str(record.path))
    labels = np.array([record.label for record in records])
    keys = part_keys(records, recipes[0].group_pattern)
    check_folds(fold_units(labels, keys, scan.classes), folds, "images" if keys is None else "groups under --group-pattern")
    fold_of = fold_assignment(labels, keys, folds, recipes[0].seed)
    devices = [resolve_device(cfg.device) for cfg in recipes]
    with process_group(devices[0] if all(device.type == "cuda" for device in devices) else CPU) as (rank, world):
        if world > 1:
            log.info("cv: rank %d of %d", rank, world)
        return _cross_validate_recipes(data_dir, recipes, folds, checked, scan, records, labels, keys, fold_of)


def _cross_validate_recipes(data_dir: Path, recipes: list, folds: int, checked, scan, records, labels, keys,
                            fold_of) -> list[dict]:
    caches: dict[tuple, dict] = {}
    for cfg, (spec, _) in zip(recipes, checked):
        key = tuple(getattr(cfg, name) for name in CACHE_SETTINGS)
        entry = caches.setdefault(key, {"spec": spec, "unfreeze": 0, "users": 0})
        entry["unfreeze"] = max(entry["unfreeze"], cfg.unfreeze)
        entry["users"] += 1
    results = []
    for cfg, (spec, _) in zip(recipes, checked):
        entry = caches[tuple(getattr(cfg, name) for name in CACHE_SETTINGS)]
        if "cache" not in entry:
            _fill_cache(entry, cfg, records, len(scan.classes))
        started = time.perf_counter()  # after the cache pass, which each of its users carries a share of
        share = entry["seconds"] / entry["users"]
        logits, points, tail_info = _out_of_fold(entry, cfg, labels, fold_of, keys, scan.classes)
        shifted = _shifted(logits, fold_of, points, resolve_ok_class(scan.classes, cfg.ok_class) if points else 0)
        result = _result(data_dir, scan, records, labels, fold_of, shifted, logits, cfg, spec, folds)
        if points:
            result["escape_budget"] = _budget_record(points, cfg)
        if tail_info is not None:
            result["tail"] = tail_info
        result["seconds_total"] = time.perf_counter() - started + share
        results.append(result)
    return results


def _fill_cache(entry: dict, cfg, records, num_classes: int) -> None:
    """The pretrained model and its frozen prefix's cached views for ``entry``'s largest ``unfreeze``."""
    started = time.perf_counter()
    spec = entry["spec"]
    img_size = cfg.resolved_img_size(spec)
    torch.manual_seed(cfg.seed)  # the new head's initial weights: the same in every run and on every torchrun rank
    model = build_model(spec, num_classes=num_classes, img_size=img_size, pretrained=cfg.pretrained,
                        weights=cfg.weights).eval()
    freeze_trunk(model, entry["unfreeze"])
    entry["model"] = model
    entry["cache"] = cache_features(frozen_prefix(model, entry["unfreeze"]), records, img_size, spec,
                                    cfg.augmented_views, cfg.seed, device=resolve_device(cfg.device), crop=cfg.crop,
                                    runtime=cfg.trunk_runtime)
    entry["seconds"] = time.perf_counter() - started


@torch.no_grad()
def _cache_for(entry: dict, unfreeze: int, device) -> torch.Tensor:
    """The cached inputs of a tail of ``unfreeze`` blocks: the shared cache, run through the frozen blocks
    between (and pooled when ``unfreeze`` is 0)."""
    cached = entry["cache"]
    if unfreeze == entry["unfreeze"]:
        return cached
    model = entry["model"]
    blocks = list(model.trunk.blocks)
    between = nn.Sequential(*blocks[len(blocks) - entry["unfreeze"]:len(blocks) - unfreeze]).to(device).eval()
    finish = (lambda x: model.trunk.pool.to(device)(between(x))) if unfreeze == 0 else between
    out = torch.stack([torch.cat([finish(chunk.float().to(device)).cpu() for chunk in torch.split(view, 128)])
                       for view in cached])
    model.cpu()
    return out if unfreeze == 0 else out.half()


def _out_of_fold(entry: dict, cfg, labels: np.ndarray, fold_of: np.ndarray, keys, classes):
    """Out-of-fold logits of ``cfg``'s recipe; with an escape budget each fold's operating point, chosen on its
    training images only (:func:`_fold_budget_point`; empty without a budget); for a trained tail what each
    fold's training did."""
    device = resolve_device(cfg.device)
    cached = _cache_for(entry, cfg.unfreeze, device)
    points: dict[int, dict] = {}
    if not cfg.unfreeze:
        logits = out_of_fold_logits(cached, labels, len(classes), fold_of, cfg.head_l2,
                                    cfg.epochs * cfg.lbfgs_iterations, cfg.seed)
        if cfg.max_escape is not None:
            for fold in np.unique(fold_of):
                train = np.flatnonzero(fold_of != fold)
                points[int(fold)] = _fold_budget_point(cached[:, torch.from_numpy(train)], train, labels, keys,
                                                       classes, cfg)
        return logits, points, None
    logits = np.zeros((len(labels), len(classes)), dtype=np.float32)
    best_epochs, seconds = [], []
    for fold in np.unique(fold_of):
        train, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        fit, stop = inner_split(labels[train], None if keys is None else [keys[i] for i in train], cfg.val_fraction,
                                cfg.seed)
        model = copy.deepcopy(entry["model"])
        freeze_trunk(model, cfg.unfreeze)
        tail = TrainableTail(model, cfg.unfreeze)
        fitted = train_tail(tail, cached, labels, train[fit], train[stop], classes, cfg, device)
        logits[held] = tail_logits(tail, cached[0, torch.from_numpy(held)]).numpy()
        if cfg.max_escape is not None:  # the refit's plain view, as finetune chooses a tail's shift; the refit
            # fitted train[fit] and train[stop] in index order, that is train
            points[int(fold)] = _fold_budget_point(fitted.train_features[:1], train, labels, keys, classes, cfg)
        best_epochs.append(fitted.best_epoch)
        seconds.append(fitted.seconds_per_epoch)
        log.info("fold %d: tail best at epoch %d of %d", fold, fitted.best_epoch, fitted.history[-1]["epoch"])
    return logits, points, {"unfreeze": cfg.unfreeze, "l2sp": cfg.l2sp, "best_epochs": best_epochs,
                            "seconds_per_epoch": float(np.mean(seconds)), "device": str(device),
                            "early_stopping": f"inner split ({cfg.val_fraction:g}) of each fold's training images"}


def _fold_budget_point(views: torch.Tensor, train: np.ndarray, labels: np.ndarray, keys, classes, cfg) -> dict:
    """``cfg.max_escape``'s operating point for one fold, out of fold on its training images ``train`` alone
    (:func:`escape_budget_point` over their ``views``: every cached view for the frozen trunk, a trained
    tail's plain-view features of the images it was trained on, optimistic, as ``finetune`` chooses)."""
    point = escape_budget_point(views, labels[train], None if keys is None else [keys[i] for i in train], classes, cfg)
    log.info("escape budget %.3f: ok logit lowered by %.3f", cfg.max_escape, point["ok_logit_shift"])
    return point


def _shifted(logits: np.ndarray, fold_of: np.ndarray, points: dict[int, dict], ok_index: int) -> np.ndarray:
    """``logits`` with each fold's ok logit lowered by its point's shift (``logits`` itself without points)."""
    if not points:
        return logits
    shifted = logits.copy()
    for fold, point in points.items():
        shifted[fold_of == fold, ok_index] -= point["ok_logit_shift"]
    return shifted


def _budget_record(points: dict[int, dict], cfg) -> dict:
    return {"max_escape": cfg.max_escape, "per_fold": [{"fold": fold, **point} for fold, point in sorted(points.items())],
            "measured_on": "each fold's training images, out of fold on inner folds; never the fold scored"
                           + (" (a tail's plain-view features of the images it trained on)" if cfg.unfreeze else "")}


def _result(data_dir: Path, scan, records, labels, fold_of, logits, unshifted, cfg, spec, folds: int) -> dict:
    """The record of one recipe: metrics of ``logits`` (the decisions as deployed, any escape-budget shift
    applied); the escape budgets' costs on ``unshifted``."""
    predicted = logits.argmax(1)
    per_fold, mean, std = _fold_summary(logits, labels, fold_of, scan.classes, cfg.ok_class)
    result = {
        "format": "edge-tl-cv",
        "version": 1,
        "data_dir": str(data_dir.resolve()),
        "backbone": spec.name,
        "img_size": cfg.resolved_img_size(spec),
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
    }
    if cfg.ok_class is not None:  # what an escape budget (finetune --max-escape) would cost on this data
        result["operating_points"] = [operating_point(unshifted, labels, scan.classes, cfg.ok_class, rate)
                                      for rate in ESCAPE_BUDGETS]
    return result
