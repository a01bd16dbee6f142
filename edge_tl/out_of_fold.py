"""Folds and out-of-fold logits of the deployed head: pure math on cached features and labels.

Cross-validation (:mod:`edge_tl.crossval`) scores every image with a head fitted on the other
folds; fine-tuning's escape budget (:func:`edge_tl.finetune.fit_operating_point`) chooses its
ok-logit shift on the same kind of out-of-fold logits of the training split
(:func:`escape_budget_point`), and so does each fold of a cross-validated recipe with an escape budget.
"""
from __future__ import annotations

import numpy as np
import torch

from edge_tl.errors import ConfigError
from edge_tl.groups import group_folds, group_keys, groups_per_class
from edge_tl.head import fit_linear_head
from edge_tl.operating_point import operating_point

DEFAULT_FOLDS = 5


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


def escape_budget_point(views: torch.Tensor, labels: np.ndarray, keys: list[str] | None, classes, cfg) -> dict:
    """``cfg.max_escape``'s operating point (:func:`edge_tl.operating_point.operating_point`) on out-of-fold
    logits of training data: ``views`` (views, N, D) of N training samples, each scored by a head fitted like
    the deployed one (``cfg.head_l2``, ``cfg.epochs * cfg.lbfgs_iterations`` iterations) on the other inner
    folds (at most ``cfg.budget_folds``, fewer when a class has fewer samples or parts). Adds ``folds``."""
    labels = np.asarray(labels)
    folds = int(min(cfg.budget_folds, max(2, min(fold_units(labels, keys, classes).values()))))
    fold_of = fold_assignment(labels, keys, folds, cfg.seed)
    logits = out_of_fold_logits(views, labels, len(classes), fold_of, cfg.head_l2, cfg.epochs * cfg.lbfgs_iterations,
                                cfg.seed)
    return {**operating_point(logits, labels, classes, cfg.ok_class, cfg.max_escape), "folds": folds}
