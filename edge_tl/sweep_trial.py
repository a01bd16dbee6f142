"""One trial of `edge-tl sweep`: its row, reused when it finished with the same fingerprint, else from running the chain.

Below both schedulers (:mod:`edge_tl.sweep` runs trials in turn, :mod:`edge_tl.sweep_ray` as Ray Tune
trials). A trial's ``trial.json`` in its run directory holds the fingerprint (the resolved recipe and
the dataset's bytes) and the row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edge_tl.artifacts import atomic_write_json, read_json, sha256_text
from edge_tl.errors import EdgeTLError

TRIAL_FILE = "trial.json"


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its name, run directory and partial recipe (``error``: why it cannot run)."""

    name: str
    run_dir: str
    overrides: dict
    error: str | None = None


def _recipe_and_fingerprint(trial: Trial, dataset_sha256: str):
    """The trial's resolved recipe and its fingerprint: the recipe's YAML and the dataset's sha256."""
    from edge_tl.recipe import recipe_from_dict

    recipe = recipe_from_dict(trial.overrides, f"trial {trial.name!r}")
    return recipe, sha256_text([recipe.to_yaml(), dataset_sha256])


def _finished_row(trial: Trial, fingerprint: str) -> dict | None:
    """The row a finished trial left in its ``trial.json`` (status ``reused``) when its fingerprint is current
    and its run is there, else None."""
    path = Path(trial.run_dir) / TRIAL_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("fingerprint") != fingerprint or not (Path(trial.run_dir) / "bench.json").is_file():
        return None
    return {**record["row"], "status": "reused"}


def reused_row(trial: Trial, dataset_sha256: str) -> dict | None:
    """The row of a trial that already finished with this recipe and dataset (status ``reused``), else None."""
    if trial.error is not None:
        return None
    return _finished_row(trial, _recipe_and_fingerprint(trial, dataset_sha256)[1])


def failed_row(trial: Trial, error: str) -> dict:
    """The row of a trial that could not run or failed: its one-line ``error``."""
    return {"name": trial.name, "status": "failed", "error": error, "run_dir": trial.run_dir}


def run_trial(data_dir: str, trial: Trial, dataset_sha256: str, threads: int | None = None,
              concurrent: bool = False) -> dict:
    """One trial: its row (reused when finished with the same fingerprint, else from running the chain).
    ``concurrent``: other trials run beside it, so its bench is not alone (``benched_alone`` False until
    :func:`bench_alone`). An edge-tl error is the row's ``error``, never raised."""
    from edge_tl.pipeline import run_pipeline
    from edge_tl.sweep_report import trial_row

    started = time.perf_counter()
    if trial.error is not None:
        return failed_row(trial, trial.error)
    try:
        recipe, fingerprint = _recipe_and_fingerprint(trial, dataset_sha256)
        reused = _finished_row(trial, fingerprint)
        if reused is not None:
            return reused
        if threads:
            import torch

            torch.set_num_threads(threads)
        run_pipeline(data_dir, trial.run_dir, recipe)
        row = {**trial_row(trial.name, Path(trial.run_dir)), "seconds": round(time.perf_counter() - started, 3),
               "benched_alone": not concurrent}
        atomic_write_json(Path(trial.run_dir) / TRIAL_FILE, {"fingerprint": fingerprint, "row": row})
        return row
    except EdgeTLError as err:
        return failed_row(trial, str(err).splitlines()[0])


def bench_alone(row: dict) -> dict:
    """A finished trial benched again with nothing else running (its recipe's bench settings) and its report
    rewritten: trials that ran side by side timed their artifacts under each other's load (on the demo set
    with two workers on two cores, 2.3-3x slower)."""
    from edge_tl.bench import benchmark
    from edge_tl.recipe import load_recipe
    from edge_tl.report import write_report
    from edge_tl.sweep_report import trial_row

    run_dir = Path(row["run_dir"])
    benchmark(run_dir, load_recipe(run_dir / "recipe.yaml").config("bench"))
    write_report(run_dir)
    record = read_json(run_dir / TRIAL_FILE)
    fresh = {**trial_row(row["name"], run_dir), "seconds": row.get("seconds"), "benched_alone": True}
    atomic_write_json(run_dir / TRIAL_FILE, {**record, "row": fresh})
    return {**fresh, "status": row["status"]}
