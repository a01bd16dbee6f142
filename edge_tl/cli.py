"""The `edge-tl` command line: parses arguments and calls the pipeline functions, nothing more."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_tl.artifacts import read_json
from edge_tl.cli_tables import (
    PREDICTIONS_SHOWN,
    cross_validation_tables,
    grid_summary,
    grid_table,
    metrics_table,
    predictions_table,
    verification_table,
)
from edge_tl.errors import EdgeTLError
from edge_tl.install_profile import require_training_side

# off a terminal (logs, CI) rich assumes 80 columns and squeezes tables; results read better whole
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log diagnostics to stderr.")
def cli(verbose: bool) -> None:
    """edge-tl: fine-tune, compress, export and verify defect-detection models for edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # under torchrun every rank runs the command; rank 0 alone prints its tables (and alone writes: the stages)
    console.quiet = os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("RANK", "0") != "0"


TRUNK_RUNTIME_OPTION = click.option(
    "--trunk-runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
    help="What runs the frozen-trunk passes: auto (ONNX Runtime on the CPU, several times faster; PyTorch on a GPU), "
         "torch or onnxruntime.")
GROUP_PATTERN_OPTION = click.option(
    "--group-pattern", default=None,
    help=r"Regex naming the part in each file name (first capture group), e.g. 'part_(\d+)': a part's images stay "
         "on one side of the split and in one fold.")
CROP_OPTION = click.option(
    "--crop", type=float, default=None,
    help="Share of the squashed image kept, centred (default 1: the whole image; 0.875 drops a 6% border).")


def frozen_trunk_options(command):
    """The options `finetune` and `cv` share: backbone, input, views, crop, parts, seed, weights, device."""
    shared = (
        click.option("--backbone", default="efficientnet_lite0", show_default=True),
        click.option("--img-size", type=int, default=None, help="Input size in pixels (default: the backbone's)."),
        click.option("--ok-class", default=None, help="The good-part class; enables escape and false-reject rates."),
        click.option("--augmented-views", type=int, default=None,
                     help="Augmented views cached per training image besides the plain view (default 4)."),
        CROP_OPTION,
        GROUP_PATTERN_OPTION,
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--weights", type=click.Path(path_type=Path), default=None, help="Pretrained weights file."),
        click.option("--strict", is_flag=True, help="Unreadable images are an error instead of a warning."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu or cuda: where the frozen-trunk passes and the trainable tail (--unfreeze) run "
                          "(auto: a CUDA GPU if PyTorch sees one); the frozen-trunk head is fitted on the CPU."),
        TRUNK_RUNTIME_OPTION,
        click.option("--epochs", type=int, default=None, help="Maximum head epochs (early stopping may end sooner)."),
        click.option("--unfreeze", type=int, default=None,
                     help="Also train the last K trunk blocks (default 0): a linear probe, then L2-SP fine-tuning "
                          "on cached activations, early stopping on an inner split of the training images."),
        click.option("--l2sp", type=float, default=None,
                     help="With --unfreeze: strength of the pull toward the pretrained weights (default 10; 0: none)."),
    )
    for option in reversed(shared):
        command = option(command)
    return command


def _finetune_config(**kwargs):
    from edge_tl.finetune import FinetuneConfig

    return FinetuneConfig(**{key: value for key, value in kwargs.items() if value is not None})


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory to create.")
@frozen_trunk_options
@click.option("--max-escape", type=float, default=None,
              help="Escape budget, e.g. 0.01: lower the ok class's logit until at most this share of the training "
                   "split's defects (out of fold) is passed as good. Needs --ok-class.")
@click.option("--no-pretrained", is_flag=True, help="Start from random weights (testing only).")
@click.option("--no-cache", is_flag=True, help="Run the trunk every epoch instead of caching its features.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
def finetune(data_dir, out, backbone, img_size, ok_class, augmented_views, crop, group_pattern, seed, weights, strict,
             device, trunk_runtime, epochs, unfreeze, l2sp, max_escape, no_pretrained, no_cache, force):
    """Fine-tune a pretrained backbone with its trunk frozen on an ImageFolder DATA_DIR."""
    require_training_side("finetune")
    from edge_tl.finetune import finetune as run_finetune

    cfg = _finetune_config(backbone=backbone, img_size=img_size, epochs=epochs, unfreeze=unfreeze, l2sp=l2sp,
                           ok_class=ok_class, max_escape=max_escape, augmented_views=augmented_views, crop=crop,
                           group_pattern=group_pattern, seed=seed,
                           weights=str(weights) if weights else None, pretrained=not no_pretrained,
                           cache_features=not no_cache, strict=strict, device=device, trunk_runtime=trunk_runtime)
    result = run_finetune(data_dir, out, cfg, force=force)
    console.print(metrics_table(result.metrics, f"validation metrics ({out})"))
    console.print(f"finetune took {result.seconds_total:.1f} s; wrote {out}/model.safetensors, run.json, metrics.json")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Metrics file (default RUN_DIR/evaluation.json).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu or cuda: where the predictions run (auto: a CUDA GPU if PyTorch sees one).")
def evaluate(run_dir, data_dir, out, device):
    """Evaluate a fine-tuned RUN_DIR on another DATA_DIR with the same classes."""
    require_training_side("evaluate")
    from edge_tl.finetune import evaluate as run_evaluate

    metrics = run_evaluate(run_dir, data_dir, out, device)
    console.print(metrics_table(metrics, f"evaluation on {data_dir}"))


@cli.command(name="cv")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--folds", type=int, default=5, show_default=True, help="Number of stratified folds.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
@click.option("--grid", "grid", type=click.Path(path_type=Path), default=None,
              help="YAML list of recipe overrides (e.g. [{unfreeze: 0}, {unfreeze: 1, l2sp: 10}]): score each on the "
                   "same folds, print one table and name the best.")
@frozen_trunk_options
def cross_validate(data_dir, folds, out, grid, backbone, img_size, ok_class, augmented_views, crop, group_pattern, seed,
                   weights, strict, device, trunk_runtime, epochs, unfreeze, l2sp):
    """Cross-validate finetune's recipe on DATA_DIR: every image scored once, out of fold."""
    require_training_side("cv")
    cfg = _finetune_config(backbone=backbone, img_size=img_size, ok_class=ok_class, seed=seed,
                           augmented_views=augmented_views, crop=crop, group_pattern=group_pattern,
                           weights=str(weights) if weights else None, epochs=epochs, unfreeze=unfreeze, l2sp=l2sp,
                           strict=strict, device=device, trunk_runtime=trunk_runtime)
    if grid is not None:
        from edge_tl.cv_grid import cross_validate_grid, load_grid

        result = cross_validate_grid(data_dir, load_grid(grid, cfg), folds, out)
        console.print(grid_table(result, f"{folds}-fold cross-validation of {len(result['rows'])} recipes ({data_dir})"))
        console.print(grid_summary(result) + (f"; wrote {out}" if out else ""))
        return
    from edge_tl.crossval import cross_validate as run_cross_validation

    result = run_cross_validation(data_dir, cfg, folds, out)
    for table in cross_validation_tables(result, f"{folds}-fold cross-validation, out-of-fold predictions ({data_dir})"):
        console.print(table)
    console.print(f"{len(result['errors'])} of {result['pooled']['num_samples']} images misclassified out of fold; "
                  f"cross-validation took {result['seconds_total']:.1f} s" + (f"; wrote {out}" if out else ""))


@cli.command(name="predict")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Write every prediction to FILE.csv (a probability column per class) or FILE.json.")
@click.option("--batch", "batch_size", type=int, default=8, show_default=True, help="Images per inference call.")
@click.option("--strict", is_flag=True, help="An image that cannot be decoded is an error instead of a warning.")
def predict_images(target, inputs, out, batch_size, strict):
    """Classify INPUTS (image files or folders) with TARGET: an .onnx / .engine artifact or a run directory."""
    from edge_tl.predict import predict

    result = predict(target, inputs, out, batch_size, strict)
    console.print(predictions_table(result, f"predictions of {Path(target).name} ({result.backend})"))
    counts = ", ".join(f"{name} {count}" for name, count in result.counts().items())
    more = f" (first {PREDICTIONS_SHOWN} shown)" if len(result.rows) > PREDICTIONS_SHOWN else ""
    console.print(f"{len(result.rows)} images{more}: {counts}" + (f"; {len(result.skipped)} skipped" if result.skipped
                                                                 else "") + (f"; wrote {out}" if out else ""))


def _print_json_summary(title: str, values: dict, keys: tuple[str, ...]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        if key in values:
            value = values[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


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
    _print_json_summary(f"pruned model ({result.pruned_dir})", result.metrics,
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
    _print_json_summary(f"fake-quantized {stage} model ({result.calibration_path})", result.metrics,
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
        _print_json_summary(f"built {manifest['path']}", manifest, ("precision", "tensorrt_version", "gpu_name",
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
    _print_json_summary(f"exported {manifest['path']}", manifest, ("size_bytes", "max_abs_diff", "top1_agreement",
                                                                   "opset", "sha256"))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="[RUN_DIR] ARTIFACT")
@click.option("--pack", "pack", type=click.Path(path_type=Path), default=None,
              help="Verification pack (export/verify-pack.STAGE.json): verify on the device, no run directory.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="With RUN_DIR: verify on this folder instead of the validation split. With --pack: the folder "
                   "holding the pack's images (class folders).")
@click.option("--max-drop", type=float, default=None,
              help="Margin: balanced-accuracy drop, points (default 5.0; with --pack, the pack's).")
@click.option("--max-escape-rise", type=float, default=None,
              help="Margin: escape-rate rise, points (default 2.0; with --pack, the pack's).")
@click.option("--confidence", type=float, default=None,
              help="Two-sided confidence of the intervals (default 0.95; with --pack, the pack's).")
@click.option("--unlabelled", default=None,
              help="Label-free evidence: a folder of images without labels, or 'train' (the run's training split; "
                   "with --pack, the pack's copy of it).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="With --pack: the record's file (default: verify/ARTIFACT.json beside the artifact).")
def verify(paths, pack, data_dir, max_drop, max_escape_rise, confidence, unlabelled, out):
    """Check an exported ARTIFACT against the float model of its stage.

    Exit 0 PASS, 1 FAIL, 3 INCONCLUSIVE (too few images to tell; the record says how many more).
    On the workstation: `verify RUN_DIR ARTIFACT`. On the device: `verify ARTIFACT --pack PACK --data DIR`,
    comparing with the float logits the pack carries.
    """
    from edge_tl.errors import ConfigError
    from edge_tl.gate import bounds_text, check_gate

    if pack is not None:
        if len(paths) != 1 or data_dir is None:
            raise ConfigError("verify --pack takes one ARTIFACT and --data DIR (the folder with the pack's images), "
                              "e.g. edge-tl verify model.float.int8.engine --pack verify-pack.float.json --data images")
        from edge_tl.verify_pack import verify_with_pack

        result = verify_with_pack(paths[0], pack, data_dir, max_drop, max_escape_rise, out, confidence=confidence,
                                  unlabelled=unlabelled)
    else:
        if len(paths) != 2:
            raise ConfigError("verify takes RUN_DIR ARTIFACT, or ARTIFACT --pack PACK --data DIR on the device")
        if out is not None:
            raise ConfigError("--out applies to verify --pack; RUN_DIR's record goes to RUN_DIR/verify/")
        require_training_side("verify RUN_DIR ARTIFACT")
        from edge_tl.verify import verify as run_verify

        settings = {key: value for key, value in (("max_drop", max_drop), ("max_escape_rise", max_escape_rise),
                                                  ("confidence", confidence)) if value is not None}
        result = run_verify(paths[0], paths[1], data_dir, unlabelled=unlabelled, **settings)
    _print_json_summary(f"verify {Path(paths[-1]).name}", result,
                        ("num_samples", "top1_agreement", "max_abs_diff", "mean_abs_diff", "balanced_accuracy",
                         "float_balanced_accuracy", "balanced_accuracy_delta", "escape_rate_delta", "verdict"))
    console.print(f"{result['verdict']}: {bounds_text(result)} against margins {result['max_drop']:g} / "
                  f"{result['max_escape_rise']:g} points", highlight=False)
    check_gate(result)


@cli.command(name="run")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Run directory; an existing `edge-tl run` directory is resumed.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="YAML recipe (every key optional; see README).")
@click.option("--ok-class", default=None, help="The good-part class (overrides finetune.ok_class of the recipe).")
@click.option("--force", is_flag=True, help="Start an existing run directory over.")
@click.option("--gate", is_flag=True, help="Exit 1 when no artifact passed verification (for a release pipeline).")
def run_command(data_dir, out, recipe_path, ok_class, force, gate):
    """Fine-tune, prune, quantize, export, verify, bench and report in one resumable command."""
    require_training_side("run", compression=True)
    from edge_tl.pipeline import run_pipeline
    from edge_tl.recipe import load_recipe, with_ok_class

    recipe = with_ok_class(load_recipe(recipe_path), ok_class)
    result = run_pipeline(data_dir, out, recipe, force=force)
    print_pipeline_result(result)
    if gate and not any(record.get("passed") for record in result.verification):
        from collections import Counter

        from edge_tl.errors import AccuracyRegressionError

        verdicts = Counter(record.get("verdict", "FAIL") for record in result.verification)
        raise AccuracyRegressionError(
            f"--gate: none of the {len(result.verification)} artifacts passed verification ("
            + ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
            + f"); see {out / 'report.md'}")


@cli.command(name="sweep")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--grid", "grid", required=True, type=click.Path(path_type=Path),
              help="YAML: trials (partial recipes) and/or grid (section.key: [values]); see README, 'Sweeps'.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Sweep directory: one run directory per trial under trials/, sweep.json/.csv, the Pareto plot.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="YAML recipe under every trial (every key optional).")
@click.option("--ok-class", default=None, help="The good-part class (finetune.ok_class of every trial).")
@click.option("--workers", type=int, default=1, show_default=True, help="Trials at a time (Ray).")
@click.option("--address", default=None, help="An existing Ray cluster (e.g. ray://head:10001); default: local Ray.")
@click.option("--scheduler", type=click.Choice(["auto", "ray", "sequential"]), default="auto", show_default=True,
              help="auto: Ray Tune when Ray is installed, else one trial after the other.")
@click.option("--max-latency-ms", type=float, default=None, help="Latency budget for the best trial (batch-1 p50).")
def sweep_command(data_dir, grid, out, recipe_path, ok_class, workers, address, scheduler, max_latency_ms):
    """Run a grid of recipes, each an `edge-tl run`, as Ray Tune trials; one table, the best within the budget.

    Exits 1 when a trial failed (its row names the error; the other trials ran)."""
    require_training_side("sweep", compression=True)
    from edge_tl.cli_tables import sweep_table
    from edge_tl.errors import TrialsFailedError
    from edge_tl.recipe import load_recipe, with_ok_class
    from edge_tl.sweep import sweep

    base = with_ok_class(load_recipe(recipe_path), ok_class).to_dict() if (recipe_path or ok_class) else None
    record = sweep(data_dir, grid, out, base, scheduler, workers, address, max_latency_ms)
    console.print(sweep_table(record))
    console.print(f"wrote {out / 'sweep.json'} and {out / 'sweep.csv'}" + (f"; plot {out / record['plot']}"
                                                                          if record["plot"] else ""))
    if record["failed"]:
        raise TrialsFailedError(f"{len(record['failed'])} of {len(record['rows'])} trials failed "
                                      f"({', '.join(record['failed'])}); their errors are in {out / 'sweep.json'}")


def _csv_list(option: str, text: str, convert):
    from edge_tl.errors import ConfigError

    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as err:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list, e.g. {option} 1,8") from err


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--backends", default="torch,onnxruntime,tensorrt", show_default=True,
              help="Comma-separated backends; unavailable ones are skipped with a reason.")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs before timing.")
@click.option("--min-time", "min_time_s", type=float, default=2.0, show_default=True,
              help="Timing budget per row, seconds (stops sooner once the variation settles).")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads for PyTorch and ONNX Runtime.")
def bench(target, backends, batch, warmup, min_time_s, threads):
    """Time every artifact of RUN_DIR (or one FILE.onnx / FILE.engine) on every available backend."""
    from edge_tl.bench import BenchConfig, bench_table, benchmark, benchmark_artifact

    cfg = BenchConfig(backends=_csv_list("--backends", backends, str), batch_sizes=_csv_list("--batch", batch, int),
                      warmup=warmup, min_time_s=min_time_s, threads=threads)
    if target.suffix in (".onnx", ".engine"):
        result = benchmark_artifact(target, cfg)
    else:
        require_training_side("bench RUN_DIR")
        result = benchmark(target, cfg)
    console.print(bench_table(result))
    if result.resolution:
        from edge_tl.report import resolution_line

        console.print(resolution_line(result.resolution))
    if target.is_dir():
        console.print(f"wrote {target / 'bench.json'} and {target / 'bench.csv'}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir):
    """Write RUN_DIR/report.md, report.html and plots/ from what the run holds."""
    from edge_tl.report import write_report

    written = write_report(run_dir)
    console.print(f"report: {written.markdown_path}\nreport: {written.html_path}\nplots: {len(written.plot_paths)} in "
                  f"{Path(run_dir) / 'plots'}")


def print_pipeline_result(result) -> None:
    """The steps (ran or skipped, seconds), the verification table and the recommendation."""

    table = Table(title=f"edge-tl run: {result.run_dir}")
    for column in ("step", "status", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left", no_wrap=True)
    for step in result.steps:
        table.add_row(step.name, step.status, f"{step.seconds:.1f}")
    console.print(table)
    console.print(verification_table(result.verification))
    bench_path = result.run_dir / "bench.json"
    recommended = read_json(bench_path).get("recommended") if bench_path.is_file() else None
    if recommended and recommended.get("artifact"):
        console.print(f"recommended: {recommended.get('artifact')} ({recommended.get('reason', '')})")
    else:
        console.print("recommended: none (no artifact passed verification)")
    console.print(f"finished in {result.seconds_total:.1f} s; report {result.run_dir / 'report.md'}")


@cli.command()
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Demo directory (default: edge-tl-demo in the system temp folder); replaced on each run.")
def demo(out):
    """Run the pipeline on an embedded, generated surface-defect dataset."""
    require_training_side("demo", compression=True)
    from edge_tl.demo import run_demo

    out = out or Path(tempfile.gettempdir()) / "edge-tl-demo"
    result = run_demo(out)
    console.print(metrics_table(read_json(result.run_dir / "metrics.json"), "demo: fine-tuned model, validation metrics"))
    print_pipeline_result(result)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, 1 for failed gates)."""
    try:
        cli.main(args=argv, prog_name="edge-tl", standalone_mode=False)
    except EdgeTLError as err:
        # escaped: messages name extras such as 'edge-tl[train]', which rich would read as markup
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return err.exit_code
    except click.exceptions.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
