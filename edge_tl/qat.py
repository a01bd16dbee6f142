"""Quantization-aware training with NNI's QATQuantizer, from the PTQ ranges (``--mode qat``)."""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibrate.calibration_file import CalibrationTensor
from edge_tl import data as data_mod
from edge_tl import nni_compat
from edge_tl.checkpoint import run_records
from edge_tl.metrics import classification_metrics
from edge_tl.quantize_config import QuantizeConfig
from edge_tl.quantize_targets import apply_calibration, current_tensors, nni_config_list, tensor_logits

from nni.compression.quantization import QATQuantizer  # after nni_compat: NNI import warnings

log = logging.getLogger(__name__)

DISTILL_TEMPERATURE = 2.0
QAT_PATIENCE_EPOCHS = 2


class _QatLoop:
    """NNI training function for QAT: augmented epochs, keep the best validation epoch (PTQ is epoch 0).

    Loss: distillation from the float model of the same stage (temperature-scaled KL), not the
    labels: QAT should make the quantized model reproduce the float one. Optimiser: SGD, momentum
    0.9, ``qat_lr`` (default 1e-5) on every BN-folded weight and bias. On the 64 px test model 1e-5
    lowered the validation KL to float every epoch (0.133 -> 0.046); 1e-4 was erratic (up to
    0.281) and Adam at 1e-4 moved away from float (0.03 -> 0.2-0.5).
    """

    def __init__(self, teacher: nn.Module, train_images: list, val_images: torch.Tensor, val_labels: np.ndarray,
                 run_info: dict, cfg: QuantizeConfig):
        self.teacher = teacher.eval()
        self.train_images, self.val_images, self.val_labels = train_images, val_images, val_labels
        self.run_info, self.cfg = run_info, cfg
        with torch.no_grad():
            self.val_teacher = F.log_softmax(torch.from_numpy(tensor_logits(teacher, val_images)), dim=1)
        self.history: list[dict] = []
        self.best: tuple = ()
        self.best_state: dict | None = None
        self.quantizer, self.plan = None, None  # set once NNI has wrapped the model

    def training_step(self, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Distillation loss: temperature-scaled KL from the float model's outputs to the fake-quantized ones."""
        with torch.no_grad():
            target = F.log_softmax(self.teacher(images) / DISTILL_TEMPERATURE, dim=1)
        student = F.log_softmax(model(images) / DISTILL_TEMPERATURE, dim=1)
        return DISTILL_TEMPERATURE ** 2 * F.kl_div(student, target, reduction="batchmean", log_target=True)

    def _validate(self, model: nn.Module, epoch: int) -> bool:
        """Record the epoch; True when it is the best so far: balanced accuracy, then closeness to float.

        The epoch is evaluated with the parameters calibration.json would get from it (exact weight
        scales instead of NNI's moving-average weight ranges), i.e. as it would be exported.
        """
        apply_calibration(self.quantizer, current_tensors(self.quantizer, self.plan))
        logits = torch.from_numpy(tensor_logits(model, self.val_images))
        predictions = logits.argmax(1).numpy()
        balanced = classification_metrics(self.val_labels, predictions, self.run_info["classes"])["balanced_accuracy"]
        divergence = float(F.kl_div(F.log_softmax(logits, dim=1), self.val_teacher, reduction="batchmean",
                                    log_target=True))
        self.history.append({"epoch": epoch, "val_balanced_accuracy": balanced, "val_kl_to_float": divergence})
        log.info("QAT epoch %d: validation balanced accuracy %.4f, KL to float %.5f", epoch, balanced, divergence)
        if self.best and (balanced, -divergence) <= self.best[:2]:
            return False
        self.best = (balanced, -divergence, epoch)
        self.best_state = copy.deepcopy(model.state_dict())
        return True

    def __call__(self, model, optimizer, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        rng = np.random.default_rng(self.cfg.seed)
        self._validate(model, 0)  # the PTQ starting point
        stale = 0
        for epoch in range(1, (max_epochs or self.cfg.qat_epochs) + 1):
            nni_compat.train_wrappers_only(model)  # BN statistics stay frozen; no dropout/stochastic depth
            for index in np.array_split(rng.permutation(len(self.train_images)),
                                        max(1, -(-len(self.train_images) // self.cfg.batch_size))):
                batch = np.stack([data_mod.normalize(data_mod.augment(self.train_images[i], rng),
                                                     self.run_info["mean"], self.run_info["std"]) for i in index])
                loss = training_step(torch.from_numpy(batch), model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            stale = 0 if self._validate(model, epoch) else stale + 1
            if stale >= QAT_PATIENCE_EPOCHS:
                log.info("QAT early stop after epoch %d (best epoch %d)", epoch, self.best[2])
                break
        model.load_state_dict(self.best_state)
        model.eval()


def qat(folded: nn.Module, teacher: nn.Module, plan, ptq_tensors, run_info: dict, val_images, val_labels,
         cfg: QuantizeConfig) -> tuple[QATQuantizer, list[CalibrationTensor], list[dict]]:
    """NNI QAT of (unwrapped) ``folded`` from the PTQ ranges; returns the wrapped quantizer, tensors, history."""
    train = run_records(run_info, "train")
    size = run_info["img_size"]
    train_images = [data_mod.resize_image(data_mod.load_image(r.path), size, data_mod.run_crop(run_info)) for r in train]
    loop = _QatLoop(teacher, train_images, val_images, val_labels, run_info, cfg)
    torch.manual_seed(cfg.seed)
    optimizer = nni_compat.traced_optimizer(torch.optim.SGD, folded.parameters(), lr=cfg.qat_lr, momentum=0.9)
    evaluator = nni_compat.TorchEvaluator(loop, optimizer, loop.training_step)
    # A fresh QATQuantizer seeded with the PTQ numbers: QATQuantizer.from_compressor(ptq) keeps the
    # PTQ wrappers, so NNI drops every already-configured target from the new quantizer.
    with nni_compat.quiet_nni():
        quantizer = QATQuantizer(folded, nni_config_list(plan), evaluator)
    apply_calibration(quantizer, ptq_tensors, with_ranges=True)
    loop.quantizer, loop.plan = quantizer, plan
    with nni_compat.quiet_nni(), nni_compat.quiet_qat_backward():
        quantizer.compress(max_steps=None, max_epochs=cfg.qat_epochs)
    tensors = current_tensors(quantizer, plan)
    apply_calibration(quantizer, tensors)
    return quantizer, tensors, loop.history
