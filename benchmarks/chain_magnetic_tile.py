"""Issues 4 and 5 targets on magnetic-tile, from a fine-tuned run (benchmarks/finetune_magnetic_tile.py).

python benchmarks/chain_magnetic_tile.py RUN_DIR [--skip-prune]

Prunes (with recovery), quantizes (PTQ) both stages, exports ONNX FP32 and INT8, verifies each
export, and times every ONNX file in ONNX Runtime on the CPU at batch 1 (median of repeated runs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _common import report

from edge_tl.prune_stage import PruneConfig, prune_run
from edge_tl.quantize import QuantizeConfig, quantize
from edge_tl.verify import verify
from export.stage import ExportConfig, export_artifact


def ort_median_ms(path: str, runs: int = 100, threads: int = 0) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    size = session.get_inputs()[0].shape[-1]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(10):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument("--recover-epochs", type=int, default=PruneConfig.recover_epochs)
    args = parser.parse_args()
    out: dict = {"command": f"python benchmarks/chain_magnetic_tile.py {args.run_dir}"}
    stages = ["float"]
    if not args.skip_prune:
        started = time.perf_counter()
        pruned = prune_run(args.run_dir, PruneConfig(recover_epochs=args.recover_epochs))
        out["prune_seconds"] = time.perf_counter() - started
        out["pruned"] = {key: pruned.metrics[key] for key in (
            "balanced_accuracy", "balanced_accuracy_delta", "escape_rate", "macs_ratio", "ort_latency_ratio",
            "ort_latency_ms", "parent_ort_latency_ms", "params")}
        stages.append("pruned")
    rows = []
    for stage in stages:
        quantized = quantize(args.run_dir, QuantizeConfig(stage=stage))
        out[f"ptq_{stage}"] = {key: quantized.metrics.get(key) for key in (
            "balanced_accuracy", "float_balanced_accuracy", "balanced_accuracy_delta", "escape_rate")}
        for precision in ("fp32", "fp16", "int8"):
            manifest = export_artifact(args.run_dir, ExportConfig(precision=precision, stage=stage))
            checked = verify(args.run_dir, manifest["path"])
            rows.append({"artifact": Path(manifest["path"]).name, "size_bytes": manifest["size_bytes"],
                         "ort_latency_ms": ort_median_ms(manifest["path"]),
                         "top1_agreement": checked["top1_agreement"],
                         "balanced_accuracy": checked["balanced_accuracy"],
                         "balanced_accuracy_delta": checked["balanced_accuracy_delta"],
                         "escape_rate_delta": checked.get("escape_rate_delta"), "passed": checked["passed"]})
    base = next(row for row in rows if row["artifact"] == "model.float.fp32.onnx")
    for row in rows:
        row["latency_ratio_vs_float_fp32"] = base["ort_latency_ms"] / row["ort_latency_ms"]
        row["size_ratio_vs_float_fp32"] = base["size_bytes"] / row["size_bytes"]
    out["artifacts"] = rows
    report("chain_magnetic_tile", out, args.run_dir.parent / f"{args.run_dir.name}-chain.json")


if __name__ == "__main__":
    main()
