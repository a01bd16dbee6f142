"""Fine-tuning the last K trunk blocks on cached activations: L2-SP toward the pretrained weights, after a linear probe.

On a few hundred images the features may adapt to the part but must not forget ImageNet. The
trainable tail (the last K trunk blocks, the pool and the head) starts from the pretrained blocks
and from the linear head fitted on their features (LP-FT: the new head does not wreck the trunk in
the first steps); the blocks are then pulled toward their pretrained values, not toward zero, by
the L2-SP penalty ``strength * ||theta - theta_pretrained||^2`` (:func:`l2sp_penalty`), applied as an
exact proximal step after each AdamW step (:func:`l2sp_proximal_step`), and weight decay toward
zero stays for the head only. BatchNorm statistics stay frozen (the blocks run in eval
mode; their affine parameters train). Early stopping watches an inner split of the training data
(``stop``), never the data a result is reported on. Last, the head is fitted once more, as the frozen
recipe fits it, on the restored tail's features of every training view (``fit`` and ``stop``): the head
the AdamW steps leave behind ranks the classes less well than a converged logistic regression, and the
escape budgets live on that ranking (benchmarks/RESULTS.md, issue 18).

The frozen prefix (every block before the tail) is a fixed function, so its activations are cached
once per image view (:func:`edge_tl.features.cache_features` over :func:`frozen_prefix`): an epoch
costs only the tail. The layer below :mod:`edge_tl.finetune` and :mod:`edge_tl.crossval`, which
both train tails with :func:`train_tail`.

Under torchrun (:mod:`edge_tl.distributed`) the tail trains with DistributedDataParallel: every rank
draws the same permutation and views, takes its shard of each minibatch, and scales its share of
the loss so that the averaged gradients are one process's; the probe and the scoring run on every
rank alike, and early stopping follows rank 0.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.device import CPU
from edge_tl.distributed import from_first_rank, group_rank, is_active, shard_bounds, sum_over_ranks
from edge_tl.errors import ConfigError
from edge_tl.features import batched
from edge_tl.head import Standardize, fit_linear_head, lbfgs_epoch
from edge_tl.metrics import classification_metrics
from edge_tl.out_of_fold import fold_assignment

log = logging.getLogger(__name__)

CHUNK = 128  # cached inputs per tail pass outside training
REFIT_ITERATIONS = 300  # the final head's L-BFGS iterations: the frozen recipe's (30 epochs x 10)


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


def frozen_prefix(model: nn.Module, unfreeze: int) -> nn.Module:
    """The fixed function whose outputs are cached: the trunk up to its last ``unfreeze`` blocks."""
    blocks = list(model.trunk.blocks)
    if unfreeze == 0:
        return model.trunk
    return nn.Sequential(*blocks[: len(blocks) - unfreeze])


class TrainableTail(nn.Module):
    """The part of the network that runs per epoch on cached inputs: last K blocks, pool, head.
    Its modules are ``model``'s own, so training the tail trains the model."""

    def __init__(self, model: nn.Module, unfreeze: int):
        super().__init__()
        blocks = list(model.trunk.blocks)
        self.blocks = nn.Sequential(*blocks[len(blocks) - unfreeze:])
        self.pool = model.trunk.pool
        self.head = model.head
        self.unfreeze = unfreeze

    def features(self, cached: torch.Tensor) -> torch.Tensor:
        """Pooled features of cached prefix activations (or of cached pooled features when K = 0)."""
        return self.pool(self.blocks(cached.float())) if self.unfreeze else cached.float()

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(cached))


def l2sp_penalty(params: list[torch.Tensor], reference: list[torch.Tensor], strength: float) -> torch.Tensor:
    """``strength * sum ||p - p_pretrained||^2`` over the unfrozen weights: L2 toward the starting point."""
    total = sum(((param - start) ** 2).sum() for param, start in zip(params, reference, strict=True))
    return strength * total


@torch.no_grad()
def l2sp_proximal_step(params: list[torch.Tensor], reference: list[torch.Tensor], strength: float, lr: float) -> None:
    """The L2-SP step after each optimizer step, decoupled as AdamW decouples weight decay: ``p`` becomes
    ``argmin_q strength * ||q - p0||^2 + ||q - p||^2 / (2 lr)`` = ``p0 + (p - p0) / (1 + 2 lr strength)``.

    Inside Adam's normalised update an L2 term in the loss would be rescaled with the loss gradient and
    could hold the weights no closer than one step (about ``lr``) to ``p0``; the proximal step is exact
    for any strength (very large: the weights stay at ``p0``), and its pull per step is ``2 lr strength``
    of the distance, so a block settles where Adam's step (``lr``) equals the pull: about
    ``1 / (2 strength)`` from its pretrained value along a steady gradient, whatever the learning rate.
    """
    shrink = 1.0 / (1.0 + 2.0 * lr * strength)
    for param, start in zip(params, reference, strict=True):
        param.copy_(start + (param - start) * shrink)


@dataclass
class TailFit:
    """What :func:`train_tail` did: per-epoch history (epoch 0 is the linear probe), the restored epoch, and the
    restored tail's features its head was refitted on."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    seconds_per_epoch: float = 0.0
    device: str = "cpu"
    train_features: torch.Tensor | None = None  # (views, N, D): the refitted head's inputs, fit and stop in index order


@torch.no_grad()
def tail_features(tail: TrainableTail, cached: torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
    """``tail.features`` over (N, ...) cached inputs in chunks on ``device``; the result on the CPU."""
    return torch.cat([tail.features(chunk.to(device)).cpu() for chunk in torch.split(cached, CHUNK)])


@torch.no_grad()
def tail_logits(tail: nn.Module, cached: torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
    """``tail`` over (N, ...) cached inputs in chunks on ``device``, eval mode; logits on the CPU."""
    tail.eval()
    return torch.cat([tail(chunk.to(device)).float().cpu() for chunk in torch.split(cached, CHUNK)])


def train_tail(tail: TrainableTail, cache: torch.Tensor, labels: np.ndarray, fit: np.ndarray, stop: np.ndarray,
               classes, cfg, device: torch.device = CPU) -> TailFit:
    """Linear probe, then L2-SP fine-tuning of ``tail`` in place; the best epoch on ``stop`` restored.

    ``cache``: (views, N, ...) cached prefix activations, view 0 plain; ``fit`` and ``stop`` index N
    (disjoint parts of the training data). The head is fitted first by ``cfg.epochs`` L-BFGS epochs on
    the pooled features of every view of ``fit`` (standardised on the plain view); then AdamW trains
    head (lr ``cfg.lr``, weight decay ``cfg.weight_decay``) and blocks (lr ``cfg.lr *
    cfg.unfreeze_lr_ratio``, no weight decay; after each step the L2-SP proximal step toward their
    starting values with strength ``cfg.l2sp``, :func:`l2sp_proximal_step`) on a
    random view per image and step, blocks in eval mode. After each epoch the plain view of ``stop`` is
    scored; epoch 0 is the probe itself, so a tail that only gets worse is never kept. ``cfg.patience``
    epochs without a better (balanced accuracy, then lower loss) end training. Then the head is refitted
    on the restored tail's features of ``fit`` and ``stop`` (:func:`refit_tail_head`); the tail is back on
    the CPU, in eval mode. Under a process group
    (torchrun) the fine-tuning steps run data-parallel (:func:`_data_parallel`), with one process's result.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(labels)
    fit, stop = np.asarray(fit), np.asarray(stop)
    views = cache.shape[0]
    class_weight = torch.as_tensor(data_mod.class_weights(labels[fit], len(classes)), dtype=torch.float32)
    targets = torch.from_numpy(labels)

    tail.to(device).eval()
    pooled = torch.stack([tail_features(tail, cache[view, torch.from_numpy(fit)], device) for view in range(views)])
    standardize = Standardize(pooled[0])
    tail.head.cpu()
    lbfgs = torch.optim.LBFGS(tail.head.parameters(), lr=1.0, max_iter=cfg.lbfgs_iterations, history_size=20,
                              line_search_fn="strong_wolfe")
    probe_inputs = standardize(pooled.reshape(-1, pooled.shape[-1]))
    for _ in range(cfg.epochs):
        lbfgs_epoch(tail.head, probe_inputs, targets[fit].repeat(views), class_weight, cfg.head_l2,
                    cfg.label_smoothing, lbfgs)

    network = _StandardizedTail(tail, standardize).to(device)
    block_params = [param for param in tail.blocks.parameters() if param.requires_grad]
    reference = [param.detach().clone() for param in block_params]
    groups = [{"params": list(tail.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if block_params:
        groups.append({"params": block_params, "lr": cfg.lr * cfg.unfreeze_lr_ratio, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    # per image, so that a rank's shard of a minibatch gives its share of the minibatch's weighted mean
    loss_fn = nn.CrossEntropyLoss(weight=class_weight.to(device), label_smoothing=cfg.label_smoothing,
                                  reduction="none")
    trained = _data_parallel(network, device)
    rank, world = group_rank()
    stop_cache, stop_labels = cache[0, torch.from_numpy(stop)], labels[stop]

    @torch.no_grad()
    def score(epoch: int, train_loss: float | None) -> tuple[float, float]:
        logits = tail_logits(network, stop_cache, device)
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(stop_labels)))
        bal = classification_metrics(stop_labels, logits.argmax(1).numpy(), classes)["balanced_accuracy"]
        bal, loss = from_first_rank([bal, loss])  # every rank decides as rank 0 does
        history.append({"epoch": epoch, "train_loss": train_loss, "stop_loss": loss, "stop_balanced_accuracy": bal,
                        "l2sp_distance": float(l2sp_penalty(block_params, reference, 1.0)) if block_params else 0.0})
        return bal, -loss

    history: list[dict] = []
    best_key, best_epoch, stale, epoch_seconds = score(0, None), 0, 0, []
    best_state = copy.deepcopy(network.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        trained.train()
        tail.blocks.eval()  # BatchNorm statistics never move
        losses = []
        for idx in batched(fit[rng.permutation(len(fit))], cfg.batch_size):
            view = torch.from_numpy(rng.integers(0, views, size=len(idx)))  # drawn for the whole minibatch
            first, last = shard_bounds(len(idx), rank, world)
            batch = cache[view[first:last], torch.from_numpy(idx[first:last])].to(device)
            # this rank's share of the minibatch's class-weighted mean cross-entropy
            share = (loss_fn(trained(batch), targets[idx[first:last]].to(device)).sum()
                     / class_weight[targets[idx]].sum().to(device))
            # the probe's objective (its L2 toward zero on the head): fine-tuning starts at the head's optimum
            head_penalty = cfg.head_l2 * tail.head.weight.pow(2).sum()
            optimizer.zero_grad()
            (share * world + head_penalty).backward()  # DDP averages the ranks' gradients: one process's
            optimizer.step()
            objective = sum_over_ranks(share.item()) + head_penalty.item()
            if block_params:
                l2sp_proximal_step(block_params, reference, cfg.l2sp, optimizer.param_groups[1]["lr"])
                with torch.no_grad():
                    objective += float(l2sp_penalty(block_params, reference, cfg.l2sp))
            losses.append(objective)  # cross-entropy plus the head's L2 and the L2-SP penalty
        scheduler.step()
        epoch_seconds.append(time.perf_counter() - start)
        key = score(epoch, float(np.mean(losses)))
        if key > best_key:
            best_key, best_epoch, stale = key, epoch, 0
            best_state = copy.deepcopy(network.state_dict())
        else:
            stale += 1
        if stale >= cfg.patience:
            log.info("tail: early stopping after epoch %d (best: epoch %d, stop-split balanced accuracy %.4f)",
                     epoch, best_epoch, best_key[0])
            break
    network.load_state_dict(best_state)
    network.cpu().eval()
    features = refit_tail_head(tail, cache, labels, np.sort(np.concatenate([fit, stop])), len(classes), cfg.head_l2,
                               cfg.seed)
    return TailFit(history, best_epoch, float(np.mean(epoch_seconds)) if epoch_seconds else 0.0, str(device), features)


def refit_tail_head(tail: TrainableTail, cache: torch.Tensor, labels: np.ndarray, train: np.ndarray, num_classes: int,
                    l2: float, seed: int) -> torch.Tensor:
    """Replace ``tail.head`` by :func:`edge_tl.head.fit_linear_head` on the tail's pooled features of every
    view of ``train`` (standardised on the plain view, folded in): on every rank alike under torchrun.
    Returns those features, (views, len(train), D)."""
    tail.cpu().eval()
    index = torch.from_numpy(np.asarray(train))
    pooled = torch.stack([tail_features(tail, cache[view, index]) for view in range(cache.shape[0])])
    with torch.enable_grad():
        head = fit_linear_head(pooled.reshape(-1, pooled.shape[-1]), np.tile(np.asarray(labels)[train], len(pooled)),
                               num_classes, l2, REFIT_ITERATIONS, seed, statistics=pooled[0])
    tail.head.load_state_dict(head.state_dict())
    return pooled


def _data_parallel(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` wrapped in DistributedDataParallel under an active process group, else ``network``.
    The wrapper broadcasts rank 0's parameters and buffers (BatchNorm statistics, the standardisation: equal
    on every rank already) and averages gradients over the ranks after each backward pass."""
    if not is_active():
        return network
    rank, world = group_rank()
    log.info("tail: DistributedDataParallel on rank %d of %d (%s)", rank, world, device)
    return nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


class _StandardizedTail(nn.Module):
    """The tail with the standardisation in front of its head, while training (folded in afterwards)."""

    def __init__(self, tail: TrainableTail, standardize: Standardize):
        super().__init__()
        self.tail = tail
        self.standardize = standardize

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return self.tail.head(self.standardize(self.tail.features(cached)))


def inner_split(labels: np.ndarray, keys: list[str] | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, stop) of a seeded, stratified split of training data (whole parts with ``keys``):
    about ``fraction`` of every class goes to ``stop``, the inner split early stopping watches."""
    folds = max(2, round(1.0 / fraction))
    fold_of = fold_assignment(np.asarray(labels), keys, folds, seed)
    return np.flatnonzero(fold_of != 0), np.flatnonzero(fold_of == 0)
