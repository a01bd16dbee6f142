"""The `edge-tl` command line: parses arguments and calls the pipeline functions, nothing more.

The commands live in cli_train (finetune, evaluate, cv, predict), cli_compress (prune, quantize, export) and
here (verify, run, sweep, bench, report, demo); all register on the one group of cli_group.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from edge_tl import cli_compress, cli_train  # noqa: F401  (registers their commands on the group)
from edge_tl.artifacts import read_json
from edge_tl.cli_group import cli, console, err_console, print_json_summary
from edge_tl.cli_tables import metrics_table, verification_table
from edge_tl.errors import EdgeTLError
from edge_tl.install_profile import require_training_side


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
    print_json_summary(f"verify {Path(paths[-1]).name}", result,
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
