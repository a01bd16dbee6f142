"""`edge-tl sweep`: every point of a grid of recipes is one `edge-tl run` in its own run directory.

A grid file (YAML) holds ``trials`` (a list of partial recipes, each with an optional ``name``),
``grid`` (recipe keys written ``section.key`` with a list of values each: their cartesian product) and
``base`` (a partial recipe under every trial); a plain list is ``trials``. With both, every trial is
combined with every grid point:

    base: {finetune: {img_size: 128, ok_class: ok}}
    trials:
      - {name: lite0}
      - {name: mobilenet, finetune: {backbone: mobilenetv3_large_100}}
    grid:
      prune.sparsity: [0.3, 0.5]

Each trial runs in ``OUT/trials/<name>`` (:func:`edge_tl.pipeline.run_pipeline`, so an interrupted
trial resumes) and leaves ``trial.json`` there: its fingerprint (the resolved recipe and the
dataset's bytes) and its row. A trial whose ``trial.json`` has the current fingerprint is reused, not
run again. Trials that ran side by side (more than one worker) are benched again one at a time
afterwards (:func:`bench_alone`), so that their latencies are comparable. A trial whose recipe is invalid, or whose run fails with an edge-tl error, is a row with
its one-line error; the others go on (one trial: :mod:`edge_tl.sweep_trial`). Trials run as Ray Tune trials when Ray is installed
(:mod:`edge_tl.sweep_ray`), else one after the other in this process. The table, the best trial
within a latency budget and the Pareto plot: :mod:`edge_tl.sweep_report`.
"""
from __future__ import annotations

import itertools
import logging
import re
import time
from pathlib import Path
from typing import Any

from edge_tl.errors import ConfigError, EdgeTLError
from edge_tl.sweep_trial import Trial, bench_alone, failed_row, reused_row, run_trial

log = logging.getLogger(__name__)

SCHEDULERS = ("auto", "ray", "sequential")


def _merge(base: dict, override: dict) -> dict:
    """``override``'s sections laid over ``base``'s, key by key."""
    merged = {section: dict(values or {}) for section, values in base.items()}
    for section, values in override.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _dotted(key: str, value: Any, source: str) -> dict:
    section, _, name = key.partition(".")
    if not section or not name:
        raise ConfigError(f"{source}: grid key {key!r} must be written section.key, e.g. prune.sparsity")
    return {section: {name: value}}


def _label(overrides: dict) -> str:
    return ", ".join(f"{section}.{key}={value}" for section, values in overrides.items()
                     if isinstance(values, dict) for key, value in values.items()) or "base"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "trial"


def grid_points(raw: Any, source: str = "grid") -> list[tuple[str, dict]]:
    """(name, partial recipe) per point of a parsed grid file, ``base`` laid under each."""
    if isinstance(raw, list):
        raw = {"trials": raw}
    unknown = sorted(set(raw) - {"base", "trials", "grid"}) if isinstance(raw, dict) else []
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; valid: base, trials, grid")
    if not isinstance(raw, dict) or not (raw.get("trials") or raw.get("grid")):
        raise ConfigError(f"{source} must hold a non-empty 'trials' list or 'grid' mapping (section.key: [values]); "
                          "see README, 'Sweeps'")
    base, trials, grid = raw.get("base") or {}, raw.get("trials") or [{}], raw.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(trials, list) or not isinstance(grid, dict):
        raise ConfigError(f"{source}: base must be a mapping, trials a list, grid a mapping of section.key: [values]")
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid key {key} must list its values, e.g. {key}: [a, b]")
        axes.append([_dotted(key, value, source) for value in values])
    points = []
    for index, trial in enumerate(trials):
        trial = {} if trial is None else trial
        if not isinstance(trial, dict):
            raise ConfigError(f"{source}: trial {index} must be a mapping of recipe sections, got {trial!r}")
        trial = dict(trial)
        name = trial.pop("name", None)
        for combination in itertools.product(*axes):
            override, point = trial, {}
            for part in combination:
                override, point = _merge(override, part), _merge(point, part)
            label = _label(point if name else override)
            points.append((f"{name} {label}" if name and combination else str(name or label), _merge(base, override)))
    names = [name for name, _ in points]
    if len(set(map(_slug, names))) != len(names):
        raise ConfigError(f"{source}: trial names repeat ({', '.join(names)}); give each trial a distinct name")
    return points


def load_grid(path: str | Path) -> list[tuple[str, dict]]:
    """The points of a grid YAML file (:func:`grid_points`)."""
    from edge_tl.recipe import read_yaml_file

    raw = read_yaml_file(path, "grid file", "pass a YAML file with trials or grid (README, 'Sweeps')")
    return grid_points(raw, str(path))


def plan_trials(points: list[tuple[str, dict]], out: Path, base_recipe: dict | None = None) -> list[Trial]:
    """A :class:`Trial` per point; a point whose recipe does not validate carries its one-line error."""
    from edge_tl.recipe import recipe_from_dict

    trials = []
    for name, overrides in points:
        merged = _merge(base_recipe or {}, overrides)
        error = None
        try:
            recipe_from_dict(merged, f"trial {name!r}")
        except EdgeTLError as err:
            error = str(err)
        trials.append(Trial(name, str(out / "trials" / _slug(name)), merged, error))
    return trials


def sweep(data_dir: str | Path, grid: str | Path, out: str | Path, base_recipe: dict | None = None,
          scheduler: str = "auto", workers: int = 1, address: str | None = None,
          max_latency_ms: float | None = None) -> dict:
    """Run every trial of ``grid`` on ``data_dir`` under ``out``; write ``out``/sweep.json, sweep.csv and
    the Pareto plot (:func:`edge_tl.sweep_report.write_sweep`); return the sweep record."""
    from edge_tl.data import scan_image_folder
    from edge_tl.pipeline import dataset_fingerprint
    from edge_tl.run_lock import run_lock
    from edge_tl.sweep_report import write_sweep

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler {scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise ConfigError(f"--max-latency-ms {max_latency_ms} must be positive")
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()  # trials may run in other folders, on other nodes
    points = load_grid(grid)
    scan_image_folder(data_dir)  # a bad dataset is one error, not one per trial
    if scheduler == "auto":
        from edge_tl.install_profile import importable

        scheduler = "ray" if importable("ray") else "sequential"
        if scheduler == "sequential":
            log.warning("Ray is not installed: the %d trials run one after the other (pip install 'edge-tl[scale]' "
                        "to run them as Ray Tune trials)", len(points))
    if scheduler == "sequential" and address is not None:
        raise ConfigError("--address needs Ray: pip install 'edge-tl[scale]', or leave --address out")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        trials = plan_trials(points, out, base_recipe)
        dataset_sha256 = dataset_fingerprint(data_dir)
        done = {trial.name: failed_row(trial, trial.error) if trial.error is not None  # no trial started for these
                else reused_row(trial, dataset_sha256) for trial in trials}
        pending = [trial for trial in trials if done[trial.name] is None]
        if scheduler == "ray" and pending:
            from edge_tl.sweep_ray import run_ray_trials

            ran = run_ray_trials(str(data_dir), pending, dataset_sha256, out, workers, address)
        else:
            ran = [run_trial(str(data_dir), trial, dataset_sha256) for trial in pending]
        by_name = {row["name"]: row for row in ran}
        rows = [done[trial.name] or by_name[trial.name] for trial in trials]
        rows = [bench_alone(row) if row["status"] != "failed" and not row.get("benched_alone", True) else row
                for row in rows]
        record = {"format": "edge-tl-sweep", "version": 1, "data_dir": str(data_dir.resolve()),
                  "scheduler": scheduler, "workers": workers, "address": address,
                  "seconds_total": round(time.perf_counter() - started, 3), "max_latency_ms": max_latency_ms,
                  "rows": rows}
        return write_sweep(out, record)
