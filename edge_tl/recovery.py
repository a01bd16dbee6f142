"""Recovery of a pruned model's accuracy: fine-tuning with distillation from the unpruned parent."""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edge_tl.errors import ConfigError

log = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(student, labels)``."""
    kl = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def _train_with_frozen_batchnorm(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def recover(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader_fn: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    val_fn: Callable[[nn.Module], float],
    epochs: int,
    lr: float,
    distill: bool = True,
    temperature: float = 4.0,
    alpha: float = 0.7,
    patience: int = 2,  # on magnetic-tile all three epochs stayed below the start: stop after two
    weight_decay: float = 1e-4,
) -> dict:
    """Fine-tune the pruned ``student`` (in place) with distillation from ``teacher``; keep the best epoch.

    Every weight trains (AdamW, cosine schedule); BatchNorm layers stay in eval mode with frozen
    statistics, because factory batches are small and few, and the statistics were already matched
    to the parent at pruning time. ``val_fn(model)`` returns balanced accuracy; epoch 0 is the
    pruned model before training, so recovery never returns something worse than it started with.
    Training stops after ``patience`` epochs without improvement.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"recovery epochs {epochs!r} is invalid; use an integer >= 0")
    if not lr > 0 or not temperature > 0 or not 0.0 <= alpha <= 1.0 or patience < 1:
        raise ConfigError(f"recovery settings lr={lr}, temperature={temperature}, alpha={alpha}, patience={patience} "
                          "are invalid; use lr > 0, temperature > 0, 0 <= alpha <= 1, patience >= 1")
    if distill and teacher is None:
        raise ConfigError("distillation needs the unpruned teacher model; pass it or set distill=False")
    flags = [(param, param.requires_grad) for param in student.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    best = float(val_fn(student.eval()))
    best_state, best_epoch, stale = copy.deepcopy(student.state_dict()), 0, 0
    history = [{"epoch": 0, "train_loss": None, "balanced_accuracy": best, "seconds": 0.0}]
    try:
        for epoch in range(1, epochs + 1):
            start, total, count = time.perf_counter(), 0.0, 0
            _train_with_frozen_batchnorm(student)
            for x, y in train_loader_fn():
                x, y = x.float(), y.long()
                logits = student(x)
                if distill:
                    with torch.no_grad():
                        teacher_logits = teacher.eval()(x)
                    loss = distillation_loss(logits, teacher_logits, y, temperature, alpha)
                else:
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(x), count + len(x)
            scheduler.step()
            accuracy = float(val_fn(student.eval()))
            history.append({"epoch": epoch, "train_loss": total / max(count, 1), "balanced_accuracy": accuracy,
                            "seconds": time.perf_counter() - start})
            log.info("recovery epoch %d: loss %.4f, balanced accuracy %.4f", epoch, total / max(count, 1), accuracy)
            if accuracy > best:
                best, best_state, best_epoch, stale = accuracy, copy.deepcopy(student.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    finally:
        student.load_state_dict(best_state)
        student.eval()
        for param, flag in flags:
            param.requires_grad_(flag)
    return {"history": history, "best_epoch": best_epoch, "best_balanced_accuracy": best,
            "stopped_early": len(history) - 1 < epochs}
