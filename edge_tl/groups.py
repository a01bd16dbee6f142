"""Group-aware splitting: every image of one physical part on the same side of a split.

Lines often photograph a part several times (cameras, lightings, repeats). Split by image, those
near-copies land in training and validation both, and every estimate reads optimistic for parts
the line has not seen. ``--group-pattern REGEX`` names the part in each file name (its first
capture group, else the whole match; a file it does not match is a group of its own); splits and
cross-validation folds then keep each group whole, still stratified by class.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_tl.data import split_stratified
from edge_tl.errors import ConfigError, DatasetError


def compile_group_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--group-pattern {pattern!r} is not a regular expression ({err}); "
                          r"use e.g. 'part_(\d+)' to group part_0042_cam1.png with part_0042_cam2.png") from err


def group_keys(paths: Sequence[str | Path], pattern: str) -> list[str]:
    """The group of each file: the pattern's first capture group in its name (else the match, else the name)."""
    compiled = compile_group_pattern(pattern)
    keys = []
    for path in paths:
        name = Path(path).name
        match = compiled.search(name)
        keys.append(name if match is None else (match.group(1) if compiled.groups else match.group(0)))
    return keys


def _class_groups(labels: np.ndarray, keys: Sequence[str]) -> dict[int, dict[str, list[int]]]:
    """Per class, its groups (sorted by key) and their sample indices."""
    by_class: dict[int, dict[str, list[int]]] = {}
    for index, (label, key) in enumerate(zip(labels, keys)):
        by_class.setdefault(int(label), {}).setdefault(key, []).append(index)
    return {label: dict(sorted(groups.items())) for label, groups in by_class.items()}


def split_groups(labels: np.ndarray, keys: Sequence[str], val_fraction: float, seed: int,
                 class_names: Sequence[str]) -> np.ndarray:
    """A validation mask: per class, whole groups in seeded order until ``round(n * val_fraction)`` images
    (at least one group each side)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    in_val = np.zeros(len(labels), dtype=bool)
    for label, groups in sorted(_class_groups(labels, keys).items()):
        if len(groups) < 2:
            raise DatasetError(f"class {class_names[label]} has a single group under --group-pattern; a split needs "
                               "two: add another part's images or loosen the pattern")
        members = list(groups.values())
        target = max(round(sum(map(len, members)) * val_fraction), 1)
        taken = 0
        for position, group in enumerate(rng.permutation(len(members))):
            if taken >= target or position == len(members) - 1:
                break
            in_val[members[group]] = True
            taken += len(members[group])
    return in_val


def group_folds(labels: np.ndarray, keys: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """A fold index per sample: per class, whole groups in seeded order, each to the fold holding fewest
    of that class so far."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for _, groups in sorted(_class_groups(labels, keys).items()):
        members = list(groups.values())
        filled = np.zeros(folds, dtype=np.int64)
        for group in rng.permutation(len(members)):
            fold = int(filled.argmin())
            assignment[members[group]] = fold
            filled[fold] += len(members[group])
    return assignment


def groups_per_class(labels: np.ndarray, keys: Sequence[str], class_names: Sequence[str]) -> dict[str, int]:
    return {class_names[label]: len(groups) for label, groups in sorted(_class_groups(np.asarray(labels), keys).items())}


def split_by_group(records: Sequence, val_fraction: float, seed: int, pattern: str, class_names: Sequence[str]
                   ) -> tuple[tuple, tuple]:
    """:func:`edge_tl.data.split_stratified` with whole groups: (train, val), each sorted by path."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} is outside (0, 1); use e.g. 0.2 for an 80/20 split")
    ordered = sorted(records, key=lambda item: (item.label, str(item.path)))
    in_val = split_groups(np.array([r.label for r in ordered]), group_keys([r.path for r in ordered], pattern),
                          val_fraction, seed, class_names)
    train = sorted((r for r, v in zip(ordered, in_val) if not v), key=lambda item: str(item.path))
    val = sorted((r for r, v in zip(ordered, in_val) if v), key=lambda item: str(item.path))
    return tuple(train), tuple(val)


def split_records(records: Sequence, val_fraction: float, seed: int, pattern: str | None, class_names: Sequence[str]
                  ) -> tuple[tuple, tuple]:
    """The run's (train, val) split: by image (:func:`edge_tl.data.split_stratified`), or by group with a pattern."""
    if pattern is None:
        return split_stratified(records, val_fraction, seed)
    return split_by_group(records, val_fraction, seed, pattern, class_names)
