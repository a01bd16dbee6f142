"""`edge-tl cv --grid FILE.yaml`: several fine-tuning recipes cross-validated on the same folds, one table, the best named.

A grid file is a YAML list of recipe overrides (or a mapping with a ``recipes`` list), each a
mapping of :class:`~edge_tl.finetune_config.FinetuneConfig` keys plus an optional ``name``:

    - {name: frozen}
    - {name: last-1, unfreeze: 1, l2sp: 10}
    - {name: last-2 at 288, unfreeze: 2, img_size: 288}

Each override applies on top of the command line's settings. Every recipe is scored by
:func:`edge_tl.crossval.cross_validate_recipes` on the same folds; the best is the highest pooled
out-of-fold balanced accuracy (then fewer escapes, then less wall time), and the summary says
whether its gain over the first recipe (the baseline) is larger than the baseline's fold-to-fold
spread. Above :mod:`edge_tl.crossval`.
"""
from __future__ import annotations

import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.artifacts import atomic_write_json
from edge_tl.crossval import cross_validate_recipes
from edge_tl.distributed import is_main_process
from edge_tl.errors import ConfigError
from edge_tl.finetune_config import FinetuneConfig
from edge_tl.out_of_fold import DEFAULT_FOLDS
from edge_tl.recipe import coerce_value, read_yaml_file


def grid_recipes(raw: Any, base: FinetuneConfig, source: str = "grid") -> list[tuple[str, FinetuneConfig]]:
    """(name, config) per entry of a parsed grid file, each entry's keys applied on top of ``base``."""
    entries = raw.get("recipes") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source} must be a non-empty list of recipe overrides, e.g. [{{unfreeze: 0}}, "
                          "{unfreeze: 1, l2sp: 10}]")
    hints = typing.get_type_hints(FinetuneConfig)
    allowed = [f.name for f in fields(FinetuneConfig)]
    recipes = []
    for index, entry in enumerate(entries):
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: entry {index} must be a mapping of finetune keys, got {entry!r}")
        bad = sorted(set(entry) - set(allowed) - {"name"})
        if bad:
            raise ConfigError(f"{source}: entry {index} has unknown key {bad[0]!r}; valid keys: name, {', '.join(allowed)}")
        settings = {key: coerce_value(f"{index}.{key}", value, hints[key], "grid") for key, value in entry.items() if key != "name"}
        name = str(entry.get("name") or ", ".join(f"{key}={value}" for key, value in settings.items()) or "base")
        recipes.append((name, replace(base, **settings)))
    names = [name for name, _ in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: recipe names repeat ({', '.join(names)}); give each entry a distinct name")
    return recipes


def load_grid(path: str | Path, base: FinetuneConfig) -> list[tuple[str, FinetuneConfig]]:
    """The recipes of a grid YAML file (:func:`grid_recipes`)."""
    raw = read_yaml_file(path, "grid file", "pass a YAML list of recipe overrides")
    return grid_recipes(raw, base, str(path))


def grid_row(name: str, result: dict) -> dict:
    """One line of the grid table: pooled and per-fold balanced accuracy, counts (at the recipe's own escape budget
    when it has one), escape-budget costs, time."""
    pooled = result["pooled"]
    row = {"name": name, "unfreeze": result["config"]["unfreeze"], "l2sp": result["config"]["l2sp"],
           "img_size": result["img_size"], "max_escape": result["config"]["max_escape"],
           "balanced_accuracy": pooled["balanced_accuracy"],
           "balanced_accuracy_fold_mean": result["mean"]["balanced_accuracy"],
           "balanced_accuracy_fold_std": result["std"]["balanced_accuracy"], "seconds_total": result["seconds_total"]}
    if result.get("ok_class") is not None:
        matrix = np.array(pooled["confusion_matrix"])
        ok = result["classes"].index(result["ok_class"])
        defect = np.arange(len(matrix)) != ok
        row.update(escapes=int(matrix[defect, ok].sum()), defects=int(matrix[defect].sum()),
                   false_rejects=int(matrix[ok].sum() - matrix[ok, ok]), goods=int(matrix[ok].sum()),
                   false_reject_rate_at_escape={f"{p['max_escape']:g}": p["false_reject_rate"]
                                                for p in result.get("operating_points", [])})
    return row


def best_row(rows: list[dict]) -> dict:
    """The highest pooled balanced accuracy, then fewer escapes, then less wall time."""
    return max(rows, key=lambda row: (row["balanced_accuracy"], -row.get("escapes", 0), -row["seconds_total"]))


def cross_validate_grid(data_dir: str | Path, recipes: list[tuple[str, FinetuneConfig]], folds: int = DEFAULT_FOLDS,
                        out: str | Path | None = None) -> dict:
    """Every (name, config) recipe cross-validated on the same folds; writes ``out`` (JSON) if given.

    Returns ``rows`` (:func:`grid_row` per recipe, in order), ``best`` (its name), ``gain_over_first``
    (the best's pooled balanced accuracy minus the first recipe's), ``first_fold_std`` (the first
    recipe's fold-to-fold standard deviation) and each recipe's full cross-validation ``results``.
    """
    results = cross_validate_recipes(data_dir, [cfg for _, cfg in recipes], folds)
    rows = [grid_row(name, result) for (name, _), result in zip(recipes, results)]
    best = best_row(rows)
    grid = {"format": "edge-tl-cv-grid", "version": 1, "folds": folds, "rows": rows, "best": best["name"],
            "gain_over_first": best["balanced_accuracy"] - rows[0]["balanced_accuracy"],
            "first_fold_std": rows[0]["balanced_accuracy_fold_std"],
            "seconds_total": float(sum(row["seconds_total"] for row in rows)),
            "results": {name: result for (name, _), result in zip(recipes, results)}}
    if out is not None and is_main_process():  # under torchrun rank 0 writes
        atomic_write_json(Path(out), grid)
    return grid
