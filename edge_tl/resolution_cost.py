"""What a run's input size costs in latency: its float model at the run's size against the same weights
at the backbone's default size, ONNX Runtime FP32, batch 1, timed in alternation.

``bench`` records it in bench.json (``resolution``) for a run fine-tuned at a larger size than its
backbone's default (e.g. 320 px against 224), and the report's Benchmark section states it, so that a
recipe's accuracy gain from a larger input can be weighed against its latency.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge_tl.backbones import build_model, get_backbone
from edge_tl.checkpoint import load_checkpoint
from edge_tl.model_cost import compare_ort_latency_ms, count_macs

log = logging.getLogger(__name__)


def resolution_cost(run_dir: str | Path, run_info: dict, runs: int = 30, warmup: int = 5, threads: int = 1
                    ) -> dict | None:
    """The run's float model timed at its input size and at its backbone's default size; None when the
    sizes agree or the weights do not fit the default size's layers."""
    spec = get_backbone(run_info["backbone"])
    size, default = int(run_info["img_size"]), spec.default_img_size
    if size == default:
        return None
    model, _ = load_checkpoint(run_dir)
    at_default = build_model(spec, num_classes=len(run_info["classes"]), img_size=default, pretrained=False)
    try:
        at_default.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as err:  # static "same" padding can give other kernel shapes at another size
        log.warning("no resolution cost: the %d px weights do not fit the %d px layers (%s)", size, default,
                    str(err).splitlines()[0])
        return None
    latency, default_latency = compare_ort_latency_ms([model, at_default], [size, default], runs, warmup, threads)
    macs, default_macs = count_macs(model, size), count_macs(at_default, default)
    return {"img_size": size, "default_img_size": default, "backend": "onnxruntime", "precision": "fp32",
            "batch_size": 1, "threads": threads, "runs": runs, "latency_ms_p50": latency,
            "default_latency_ms_p50": default_latency, "latency_ratio": latency / default_latency,
            "macs": macs, "default_macs": default_macs, "macs_ratio": macs / default_macs}

