"""The deployed head of a frozen-trunk run: a standardised logistic regression folded into one nn.Linear.

Fine-tuning fits it on cached trunk features (:mod:`edge_tl.finetune`); after a change to the trunk
(INT8 fake quantization, pruning) :func:`refit_head` fits it again on what the trunk now outputs.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.device import CPU, placed

log = logging.getLogger(__name__)

DEFAULT_HEAD_L2 = 1e-2


class Standardize(nn.Module):
    """Fixed per-feature standardisation in front of the head; folded into the head after training."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        std = features.std(0)
        # Near-constant features would get huge folded weights (and fp32/fp16 round-off): floor them.
        self.register_buffer("std", std.clamp_min(0.1 * float(std.mean()) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def fold_standardization(head: nn.Linear, standardize: Standardize) -> None:
    """head(standardize(x)) == head'(x): the deployed head stays one plain nn.Linear."""
    weight = head.weight / standardize.std
    head.bias.sub_((weight * standardize.mean).sum(1))
    head.weight.copy_(weight)


def lbfgs_epoch(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                l2: float, label_smoothing: float, optimizer: torch.optim.LBFGS) -> float:
    """One epoch of full-batch L-BFGS on the standardised cached features (class-weighted, L2)."""

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(features), targets, weight=weights,
                                           label_smoothing=label_smoothing)
        loss = loss + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    return optimizer.step(closure).item()


@torch.no_grad()
def trunk_features(model: nn.Module, records, img_size: int, mean, std, batch_size: int = 32,
                   device: torch.device = CPU, crop: float = 1.0) -> torch.Tensor:
    """``model.trunk`` on the plain view (the inference transform) of ``records``, in batches, run on
    ``device``; the features come back on the CPU."""
    records = list(records)
    with placed(model.trunk, device) as trunk:
        return torch.cat([
            trunk(torch.from_numpy(data_mod.load_tensor_batch(records[i:i + batch_size], img_size, mean, std, crop=crop))
                  .to(device)).cpu()
            for i in range(0, len(records), batch_size)
        ])


def fit_linear_head(features: torch.Tensor, labels: np.ndarray, num_classes: int, l2: float,
                    iterations: int = 200, seed: int = 0, statistics: torch.Tensor | None = None) -> nn.Linear:
    """The deployed head for fixed ``features``: a class-weighted, L2-regularised logistic regression
    on standardised features, fitted by full-batch L-BFGS, folded into one plain nn.Linear.
    ``statistics`` (default ``features``) are the features the standardisation is measured on:
    fine-tuning measures it on the plain view even when augmented views join the fit."""
    torch.manual_seed(seed)
    features = features.float()
    standardize = Standardize(features if statistics is None else statistics.float())
    head = nn.Linear(features.shape[1], num_classes)
    weights = torch.as_tensor(data_mod.class_weights(labels, num_classes), dtype=torch.float32)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")
    lbfgs_epoch(head, standardize(features), torch.as_tensor(labels, dtype=torch.long), weights, l2, 0.0, optimizer)
    fold_standardization(head, standardize)
    return head


def refit_head(model: nn.Module, run_info: dict, evaluate: Callable[[nn.Module], dict], metrics: dict
               ) -> tuple[dict, dict]:
    """Refit ``model.head`` on what ``model.trunk`` now outputs for the training split (plain view).

    After a change to the trunk (INT8 fake quantization, pruning) the head of a frozen-trunk run,
    a standardised logistic regression leaning on low-spread features, reads shifted features; the
    same fit (run's L2, training split only) on the new features matches them again. The refit is
    kept only when ``evaluate(model)["balanced_accuracy"]`` does not fall below ``metrics``' (the
    model's before it), like early stopping. Returns (metrics of the kept model, a summary).
    """
    from edge_tl.finetune import run_records

    train = run_records(run_info, "train")
    features = trunk_features(model, train, run_info["img_size"], run_info["mean"], run_info["std"],
                              crop=data_mod.run_crop(run_info))
    l2 = float(run_info.get("config", {}).get("head_l2", DEFAULT_HEAD_L2))
    head = fit_linear_head(features, np.array([r.label for r in train]), len(run_info["classes"]), l2)
    point = run_info.get("operating_point")
    if point:  # the run's escape budget: its ok-logit shift applies to the refitted head as well
        from edge_tl.crossval import apply_ok_shift

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
