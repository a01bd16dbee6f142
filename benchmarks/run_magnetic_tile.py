"""Issue 6 headline: `edge-tl run` on magnetic-tile against what users would otherwise do.

python benchmarks/run_magnetic_tile.py --out RUN [--recipe FILE]

1. `edge-tl run ../shared/datasets/magnetic-tile --out RUN --ok-class free` (the default recipe,
   or FILE), timed end to end; an existing RUN is resumed like any `edge-tl run` directory.
2. Baselines: PyTorch eager FP32 and the plain ONNX Runtime FP32 export of the fine-tuned model
   (both rows of RUN/bench.json), and ONNX Runtime's own ``quantize_static`` with its defaults on
   that FP32 export, calibrated on the same class-balanced training images edge-tl uses; its
   accuracy comes from the same validation split and preprocessing, its latency from the same
   benchmark code.
3. Prints and writes RUN/headline.json: batch-1 latency, balanced accuracy and escape rate of each
   baseline and of the recommended artifact, with the speed-up ratios the issue's targets name.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from _common import dataset_dir, report

from edge_tl.artifacts import atomic_write_json, read_json
from edge_tl.bench import benchmark_artifact
from edge_tl.data import run_crop
from edge_tl.pipeline import run_pipeline
from edge_tl.recipe import load_recipe, with_ok_class
from edge_tl.verify import artifact_predictions


def ort_static_baseline(run_dir: Path, calib_images: int) -> Path:
    """ONNX Runtime's quantize_static with its defaults (QDQ, int8 activations and weights, per tensor,
    MinMax) on the FP32 export; edge-tl's preprocessing metadata is copied so verify can feed it."""
    import onnx
    from onnxruntime.quantization import quantize_static

    from calibrate.sources import ClassBalancedSource
    from edge_tl.finetune import run_records

    run_info = read_json(run_dir / "run.json")
    fp32 = run_dir / "export" / "model.float.fp32.onnx"
    out_dir = run_dir / "baselines"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "model.float.ort-static-int8.onnx"
    source = ClassBalancedSource(run_records(run_info, "train"), calib_images, run_info["img_size"],
                                 run_info["mean"], run_info["std"], crop=run_crop(run_info))
    staged = out_dir / ".ort-static.partial.onnx"
    quantize_static(str(fp32), str(staged), source)
    model = onnx.load(str(staged))
    present = {p.key for p in model.metadata_props}
    for prop in onnx.load(str(fp32)).metadata_props:
        if prop.key not in present:
            model.metadata_props.append(prop)
    onnx.save(model, str(staged))
    staged.replace(out)
    return out


def _row(bench: dict, artifact: str, backend: str, batch_size: int = 1) -> dict | None:
    return next((row for row in bench["rows"] if row["artifact"] == artifact and row["backend"] == backend
                 and row["batch_size"] == batch_size), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=None)
    parser.add_argument("--calib-images", type=int, default=256)
    args = parser.parse_args()
    data = dataset_dir("magnetic-tile")
    recipe = with_ok_class(load_recipe(args.recipe), "free")
    out: dict = {"command": f"python benchmarks/run_magnetic_tile.py --out {args.out}"
                 + (f" --recipe {args.recipe}" if args.recipe else "")}
    started = time.perf_counter()
    result = run_pipeline(data, args.out, recipe)
    out["run_seconds"] = time.perf_counter() - started
    out["steps"] = {step.name: {"status": step.status, "seconds": round(step.seconds, 1)} for step in result.steps}

    baseline = ort_static_baseline(args.out, args.calib_images)
    predictions = artifact_predictions(args.out, baseline, with_float=False).metrics()
    bench_cfg = replace(recipe.config("bench"), backends=("onnxruntime",), batch_sizes=(1,))
    timing = benchmark_artifact(baseline, bench_cfg).rows[0]
    bench = read_json(args.out / "bench.json")
    float_metrics = read_json(args.out / "metrics.json")
    static_row = {"latency_ms": timing.latency_ms, "balanced_accuracy": predictions["balanced_accuracy"],
                  "escape_rate": predictions.get("escape_rate")}
    baselines = {  # label in the table -> (key of its speed-up, bench row)
        "pytorch eager fp32": ("pytorch_eager_fp32", _row(bench, "model.float (pytorch)", "torch")),
        "onnxruntime fp32 export": ("onnxruntime_fp32_export", _row(bench, "model.float.fp32.onnx", "onnxruntime")),
        "onnxruntime quantize_static (defaults)": ("onnxruntime_quantize_static", static_row),
    }

    def summary(row: dict) -> dict:
        return {"latency_ms_p50": row["latency_ms"]["p50"], "balanced_accuracy": row.get("balanced_accuracy"),
                "escape_rate": row.get("escape_rate")}

    table = {label: summary(row) for label, (_, row) in baselines.items() if row is not None}
    recommended = bench.get("recommended") or {}
    best_row = (_row(bench, recommended["artifact"], recommended.get("backend", "onnxruntime"))
                if recommended.get("artifact") else None)
    if best_row is not None:
        best = table[f"edge-tl recommended ({recommended['artifact']})"] = summary(best_row)
        for label, (key, row) in baselines.items():
            if row is not None:
                best[f"speedup_vs_{key}"] = row["latency_ms"]["p50"] / best["latency_ms_p50"]
        best["balanced_accuracy_delta_vs_float"] = 100.0 * (best["balanced_accuracy"]
                                                             - float_metrics["balanced_accuracy"])
        best["escape_rate_float"] = float_metrics.get("escape_rate")
    out["headline"] = table
    out["recommended"] = recommended
    atomic_write_json(args.out / "headline.json", out)
    report("run_magnetic_tile", out, None)


if __name__ == "__main__":
    main()
