"""The `edge-tl` click group and consoles the command modules register on and print with."""
from __future__ import annotations

import logging
import os
import sys

import click
from rich.console import Console
from rich.table import Table

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


def print_json_summary(title: str, values: dict, keys: tuple[str, ...]) -> None:
    """A two-column table of the named values a stage returned."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        if key in values:
            value = values[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)

