"""`edge-tl finetune`, `evaluate`, `cv` and `predict`: the training-side commands on images."""
from __future__ import annotations

from pathlib import Path

import click

from edge_tl.cli_group import cli, console
from edge_tl.cli_tables import (
    PREDICTIONS_SHOWN,
    cross_validation_tables,
    grid_summary,
    grid_table,
    metrics_table,
    predictions_table,
)
from edge_tl.install_profile import require_training_side


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
        click.option("--head-l2", type=float, default=None,
                     help="L2 penalty of the linear head on standardised features (default 0.01; 0.001 suits 416 px)."),
        click.option("--budget-folds", type=int, default=None,
                     help="With --max-escape: inner folds of the training images its shift is measured on (default 5; "
                          "10 gives each inner head nine tenths of them, and a shift nearer the deployed head's)."),
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
             device, trunk_runtime, epochs, unfreeze, l2sp, head_l2, budget_folds, max_escape, no_pretrained, no_cache,
             force):
    """Fine-tune a pretrained backbone with its trunk frozen on an ImageFolder DATA_DIR."""
    require_training_side("finetune")
    from edge_tl.finetune import finetune as run_finetune

    cfg = _finetune_config(backbone=backbone, img_size=img_size, epochs=epochs, unfreeze=unfreeze, l2sp=l2sp,
                           ok_class=ok_class, max_escape=max_escape, augmented_views=augmented_views, crop=crop,
                           group_pattern=group_pattern, seed=seed, head_l2=head_l2, budget_folds=budget_folds,
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
@click.option("--max-escape", type=float, default=None,
              help="Score the recipe with finetune's escape budget, e.g. 0.02: each fold lowers the ok class's logit "
                   "as chosen out of fold on its own training images. Needs --ok-class.")
def cross_validate(data_dir, folds, out, grid, backbone, img_size, ok_class, augmented_views, crop, group_pattern, seed,
                   weights, strict, device, trunk_runtime, epochs, unfreeze, l2sp, head_l2, budget_folds, max_escape):
    """Cross-validate finetune's recipe on DATA_DIR: every image scored once, out of fold."""
    require_training_side("cv")
    cfg = _finetune_config(backbone=backbone, img_size=img_size, ok_class=ok_class, seed=seed,
                           augmented_views=augmented_views, crop=crop, group_pattern=group_pattern,
                           weights=str(weights) if weights else None, epochs=epochs, unfreeze=unfreeze, l2sp=l2sp,
                           strict=strict, device=device, trunk_runtime=trunk_runtime, max_escape=max_escape,
                           head_l2=head_l2, budget_folds=budget_folds)
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
