"""The deployed head of a frozen-trunk run: a standardised logistic regression folded into one nn.Linear.

Pure math on feature tensors, the bottom layer of fine-tuning: fine-tuning (:mod:`edge_tl.finetune`)
and cross-validation (:mod:`edge_tl.crossval`) fit it on cached trunk features; after a change to the
trunk (INT8 fake quantization, pruning) :func:`edge_tl.head_refit.refit_head` fits it again on what
the trunk now outputs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod

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
