"""Calibration by forward hooks: ranges of every Conv2d/Linear input and output, weights per channel.

A plain-PyTorch calibrator (no NNI) over a calibration source: the reference the NNI quantizer's
ranges can be checked against, and a quick way to make a calibration.json for tests and
benchmarks. Give it the BN-folded model (:func:`edge_tl.fold.fold_batchnorm`), as calibration.json
names modules of that model.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from calibrate.calibration_file import Calibration, CalibrationTensor
from calibrate.ranges import DEFAULT_PERCENTILE, RangeObserver, check_range_method
from calibrate.sources import CalibrationSource, iter_batches

logger = logging.getLogger(__name__)

OBSERVED_MODULES = (nn.Conv2d, nn.Linear)


def observe_activations(model: nn.Module, source: CalibrationSource, num_bins: int = 2048) -> dict[tuple[str, str], RangeObserver]:
    """{(module, "input"|"output"): RangeObserver} over every batch of ``source``."""
    observers: dict[tuple[str, str], RangeObserver] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            for role, tensor in (("input", args[0]), ("output", output)):
                observer = observers.setdefault((name, role), RangeObserver(num_bins=num_bins))
                observer.update(tensor.detach().float().cpu().numpy())

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, OBSERVED_MODULES)
    ]
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in iter_batches(source):
                model(torch.from_numpy(batch))
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    logger.info("observed %d tensors over %d calibration batches", len(observers), batches)
    return observers


def collect_calibration(
    model: nn.Module,
    source: CalibrationSource,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    model_info: Mapping[str, Any] | None = None,
    calibration_files_hash: str = "",
) -> Calibration:
    """A Calibration of ``model`` (BN-folded): uint8 activations by ``method``, int8 per-channel weights."""
    check_range_method(method, percentile)
    observers = observe_activations(model, source)
    tensors = []
    for name, module in model.named_modules():
        if not isinstance(module, OBSERVED_MODULES):
            continue
        for role in ("input", "output"):
            observer = observers.get((name, role))
            if observer is not None:
                low, high = observer.compute(method, percentile)
                observed = {} if method == "minmax" else {
                    "observed_min": observer.min_value, "observed_max": observer.max_value}
                tensors.append(CalibrationTensor.activation(name, role, low, high, **observed))
        tensors.append(CalibrationTensor.weight(name, module.weight.detach().cpu().numpy()))
    info = {"input_name": getattr(source, "input_name", "input"), **dict(model_info or {})}
    return Calibration(info, method, calibration_files_hash, tuple(tensors))
