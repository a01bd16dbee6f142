"""`edge-tl prune`, `quantize` and `export`: the commands that turn a fine-tuned run into deployable artifacts."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from edge_tl.cli_group import cli, console, err_console, print_json_summary
from edge_tl.install_profile import require_training_side


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Share of expansion channels removed.")
@click.option("--method", type=click.Choice(["contribution", "l1", "l2", "fpgm", "taylor"]), default="contribution",
              show_default=True, help="Channel importance: output energy on training images (contribution) or NNI pruners.")
@click.option("--align", type=int, default=8, show_default=True, help="Round channel counts to multiples of this.")
@click.option("--recover-epochs", type=int, default=3, show_default=True)
@click.option("--distill/--no-distill", default=True, show_default=True, help="Distil from the unpruned model.")
@click.option("--require-speedup", is_flag=True, help="Exit 1 when the pruned model is not faster in ONNX Runtime.")
@click.option("--sweep", is_flag=True, help="Measure accuracy, MACs and latency per stage and sparsity instead.")
@click.option("--seed", type=int, default=0, show_default=True)
def prune(run_dir, sparsity, method, align, recover_epochs, distill, require_speedup, sweep, seed):
    """Prune a fine-tuned RUN_DIR with NNI, recover accuracy, and write RUN_DIR/pruned/."""
    require_training_side("prune", compression=True)
    from edge_tl.prune_stage import PruneConfig, prune_run, sweep_run

    cfg = PruneConfig(sparsity=sparsity, method=method, align=align, recover_epochs=recover_epochs, distill=distill,
                      require_speedup=require_speedup, seed=seed)
    if sweep:
        result = sweep_run(run_dir, cfg)
        table = Table(title=f"prune sweep ({run_dir}/pruned_sweep.json)")
        for column in ("configuration", "bal. acc. delta (pt)", "MACs ratio", "latency ratio"):
            table.add_column(column, justify="right" if column != "configuration" else "left")
        for row in result["rows"]:
            table.add_row(row["label"], f"{row['balanced_accuracy_delta']:+.2f}", f"{row['macs_ratio']:.2f}",
                          f"{row['ort_latency_ratio']:.2f}")
        console.print(table)
        console.print(f"recommended: {result.get('recommended')}")
        return
    result = prune_run(run_dir, cfg)
    print_json_summary(f"pruned model ({result.pruned_dir})", result.metrics,
                        ("balanced_accuracy", "balanced_accuracy_delta", "escape_rate", "params", "macs",
                         "macs_ratio", "ort_latency_ms", "parent_ort_latency_ms", "ort_latency_ratio"))
    if not result.faster_than_parent:
        err_console.print("warning: the pruned model is not faster than its parent in ONNX Runtime")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--stage", type=click.Choice(["float", "pruned"]), default="float", show_default=True)
@click.option("--mode", type=click.Choice(["ptq", "qat"]), default="ptq", show_default=True)
@click.option("--calib-images", type=int, default=512, show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True)
@click.option("--qat-epochs", type=int, default=3, show_default=True)
@click.option("--float-head/--int8-head", default=True, show_default=True,
              help="Keep the classifier head (the layer producing the logits) in float.")
@click.option("--float-stem/--int8-stem", default=True, show_default=True,
              help="Keep the stem (the convolution reading the image) in float.")
@click.option("--reconstruct/--no-reconstruct", default=True, show_default=True,
              help="Re-solve each quantized convolution against the float model (least squares + GPTQ rounding).")
@click.option("--refit-head/--no-refit-head", default=False, show_default=True,
              help="After PTQ, refit the float head on the quantized trunk's training features.")
@click.option("--seed", type=int, default=0, show_default=True)
def quantize(run_dir, stage, mode, calib_images, method, qat_epochs, float_head, float_stem, reconstruct, refit_head,
             seed):
    """INT8 ranges with NNI (PTQ or QAT) -> RUN_DIR/quantized/STAGE/calibration.json and metrics."""
    require_training_side("quantize", compression=True)
    from edge_tl.quantize import QuantizeConfig
    from edge_tl.quantize import quantize as run_quantize

    cfg = QuantizeConfig(stage=stage, mode=mode, calib_images=calib_images, method=method, qat_epochs=qat_epochs,
                         float_head=float_head, float_stem=float_stem, reconstruct=reconstruct, refit_head=refit_head,
                         seed=seed)
    result = run_quantize(run_dir, cfg)
    print_json_summary(f"fake-quantized {stage} model ({result.calibration_path})", result.metrics,
                        ("balanced_accuracy", "float_balanced_accuracy", "balanced_accuracy_delta", "escape_rate",
                         "accuracy"))


@cli.command(name="export")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "engine"]), default=None,
              help="onnx (default for a run directory) or engine (the only choice for MODEL.onnx).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--stage", type=click.Choice(["float", "pruned"]), default="float", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--target", "qdq_target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="INT8 ONNX flavour: uint8 activations for ONNX Runtime, int8 Q/DQ for TensorRT.")
@click.option("--dla-core", type=int, default=None, help="Jetson DLA core for engines (GPU fallback on).")
@click.option("--max-batch", type=int, default=None,
              help="Largest batch the engine takes (profile: min 1, opt and max N; default 8 for MODEL.onnx, 1 for a "
                   "run directory).")
@click.option("--workspace", "workspace_mb", type=int, default=1024, show_default=True, help="Builder workspace, MB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None)
@click.option("--calibration-cache", type=click.Path(path_type=Path), default=None,
              help="Implicit-INT8 cache for an FP32 MODEL.onnx (default: the one its manifest names).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Engine file for MODEL.onnx (default: beside it, model.STAGE.PRECISION.engine).")
def export_command(target, fmt, precision, stage, opset, dynamic_batch, qdq_target, dla_core, max_batch, workspace_mb,
                   timing_cache, calibration_cache, out):
    """Export a run's model to ONNX or an engine, or build an engine from an exported MODEL.onnx alone.

    TARGET is a run directory (training side) or an .onnx file from `edge-tl export` (device side: its
    metadata gives the preprocessing and stage; no run directory, no torch).
    """
    if target.suffix == ".onnx":
        from export.engine_from_onnx import EngineConfig, build_engine_from_onnx

        cfg = EngineConfig(format=fmt or "engine", precision=precision, dla_core=dla_core,
                           max_batch=8 if max_batch is None else max_batch, workspace_mb=workspace_mb,
                           timing_cache=str(timing_cache) if timing_cache else None,
                           calibration_cache=str(calibration_cache) if calibration_cache else None,
                           out=str(out) if out else None)
        manifest = build_engine_from_onnx(target, cfg)
        print_json_summary(f"built {manifest['path']}", manifest, ("precision", "tensorrt_version", "gpu_name",
                                                                   "dla_core", "size_bytes", "sha256"))
        return
    require_training_side("export RUN_DIR")
    from export.stage import ExportConfig, export_artifact

    if calibration_cache is not None or out is not None:
        from edge_tl.errors import ConfigError

        raise ConfigError("--calibration-cache and --out apply to building an engine from MODEL.onnx; drop them for "
                          "a run directory")
    cfg = ExportConfig(format=fmt or "onnx", precision=precision, stage=stage, opset=opset,
                       dynamic_batch=dynamic_batch, target=qdq_target, dla_core=dla_core,
                       max_batch=1 if max_batch is None else max_batch, workspace_mb=workspace_mb,
                       timing_cache=str(timing_cache) if timing_cache else None)
    manifest = export_artifact(target, cfg)
    print_json_summary(f"exported {manifest['path']}", manifest, ("size_bytes", "max_abs_diff", "top1_agreement",
                                                                   "opset", "sha256"))
