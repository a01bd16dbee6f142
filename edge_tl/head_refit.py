"""Refit a run's head on what its changed trunk now outputs (after pruning or INT8 fake quantization).

A frozen-trunk pass (:func:`edge_tl.features.trunk_features`) over the run's training split, then
the head's own fit (:func:`edge_tl.head.fit_linear_head`) with the run's escape-budget shift.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
from torch import nn

from edge_tl import data as data_mod
from edge_tl.checkpoint import run_records
from edge_tl.features import trunk_features
from edge_tl.head import DEFAULT_HEAD_L2, fit_linear_head
from edge_tl.operating_point import apply_ok_shift

log = logging.getLogger(__name__)


def refit_head(model: nn.Module, run_info: dict, evaluate: Callable[[nn.Module], dict], metrics: dict
               ) -> tuple[dict, dict]:
    """Refit ``model.head`` on what ``model.trunk`` now outputs for the training split (plain view).

    After a change to the trunk (INT8 fake quantization, pruning) the head of a frozen-trunk run,
    a standardised logistic regression leaning on low-spread features, reads shifted features; the
    same fit (run's L2, training split only) on the new features matches them again. The refit is
    kept only when ``evaluate(model)["balanced_accuracy"]`` does not fall below ``metrics``' (the
    model's before it), like early stopping. Returns (metrics of the kept model, a summary).
    """
    train = run_records(run_info, "train")
    features = trunk_features(model, train, run_info["img_size"], run_info["mean"], run_info["std"],
                              crop=data_mod.run_crop(run_info))
    l2 = float(run_info.get("config", {}).get("head_l2", DEFAULT_HEAD_L2))
    head = fit_linear_head(features, np.array([r.label for r in train]), len(run_info["classes"]), l2)
    point = run_info.get("operating_point")
    if point:  # the run's escape budget: its ok-logit shift applies to the refitted head as well
        apply_ok_shift(head, run_info["classes"].index(run_info["ok_class"]), point["ok_logit_shift"])
    previous = copy.deepcopy(model.head.state_dict())
    model.head.load_state_dict(head.state_dict())
    refit = evaluate(model)
    kept = refit["balanced_accuracy"] >= metrics["balanced_accuracy"]
    if not kept:
        model.head.load_state_dict(previous)
    log.info("head refit: balanced accuracy %.4f -> %.4f (%s)", metrics["balanced_accuracy"],
             refit["balanced_accuracy"], "kept" if kept else "discarded")
    summary = {"kept": kept, "balanced_accuracy_before": metrics["balanced_accuracy"],
               "balanced_accuracy_after": refit["balanced_accuracy"], "train_images": len(train)}
    return (refit if kept else metrics), summary
