"""What a model costs: parameters, multiply-accumulates and ONNX Runtime CPU latency.

The counters run on any ``nn.Module`` taking (N, 3, H, W) images; latency exports the model to ONNX
in a temporary folder and times it in ONNX Runtime (imported only when latency is asked for).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one image (groups-aware; BN and activations not counted)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return total


def _ort_session(model: nn.Module, img_size: int, threads: int):
    import onnxruntime as ort

    training = model.training
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        try:
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, img_size, img_size),), str(path), dynamo=False,
                              input_names=["input"], output_names=["logits"], opset_version=17)
        finally:
            model.train(training)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_ort_latency_ms(models: list[nn.Module], img_size: int | Sequence[int], runs: int = 50, warmup: int = 10,
                           threads: int = 1) -> list[float]:
    """Median ONNX Runtime CPU latency (ms, batch 1) of each model, timed in alternation; ``img_size`` is one
    input size for all or one per model.

    Runs alternate between the models, so a change in machine load affects all of them alike and
    their ratio stays meaningful on a shared machine.
    """
    import numpy as np

    sizes = [img_size] * len(models) if isinstance(img_size, int) else list(img_size)
    sessions = [_ort_session(model, size, threads) for model, size in zip(models, sizes, strict=True)]
    feeds = [{"input": np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)} for size in sizes]
    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)
    timings: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, feed, times in zip(sessions, feeds, timings):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(times) for times in timings]


def ort_latency_ms(model: nn.Module, img_size: int, runs: int = 50, warmup: int = 10, threads: int = 1) -> float:
    """Median ONNX Runtime CPU latency (ms) of one batch-1 inference, after ``warmup`` runs."""
    return compare_ort_latency_ms([model], img_size, runs, warmup, threads)[0]
