"""Intervals and tests on paired tables: Wilson, Newcombe's square-and-add, MOVER, exact McNemar, label-free bounds.

The methods and their references are in paired_stats' docstring; paired_stats decides the gate from them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from edge_tl.errors import ConfigError, DatasetError
from edge_tl.paired_counts import PairedTable, escape_rate_delta


def z_value(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval at ``confidence``."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence {confidence!r} must lie strictly between 0 and 1, e.g. 0.95")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def wilson_limits(successes: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score limits, the formula of scipy's ``proportion_ci(method="wilson")``, vectorised."""
    successes, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    center = (successes + z * z / 2.0) / (n + z * z)
    half = z * np.sqrt(np.maximum(successes * (n - successes) / n + z * z / 4.0, 0.0)) / (n + z * z)
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def newcombe_limits_at(counts: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(delta, lower, upper) of artifact minus float accuracy for tables in the last axis (CELLS order)."""
    both_right, float_only, artifact_only, both_wrong = np.moveaxis(np.asarray(counts, dtype=float), -1, 0)
    n = both_right + float_only + artifact_only + both_wrong
    artifact_right, float_right = both_right + artifact_only, both_right + float_only
    p_artifact, p_float = artifact_right / n, float_right / n
    lower_artifact, upper_artifact = wilson_limits(artifact_right, n, z)
    lower_float, upper_float = wilson_limits(float_right, n, z)
    # psi as in contingencytables::Newcombe_square_and_add_CI_paired_2x2 (0 on a zero margin)
    margins = artifact_right * (n - artifact_right) * float_right * (n - float_right)
    cross = both_right * both_wrong - float_only * artifact_only
    numerator = np.where(cross > n / 2.0, cross - n / 2.0, np.where(cross < 0.0, cross, 0.0))
    psi = np.where(margins > 0, numerator / np.sqrt(np.where(margins > 0, margins, 1.0)), 0.0)
    estimate = p_artifact - p_float
    down_a, up_f = p_artifact - lower_artifact, upper_float - p_float
    down_f, up_a = p_float - lower_float, upper_artifact - p_artifact
    lower = estimate - np.sqrt(np.maximum(down_a ** 2 + up_f ** 2 - 2.0 * psi * down_a * up_f, 0.0))
    upper = estimate + np.sqrt(np.maximum(down_f ** 2 + up_a ** 2 - 2.0 * psi * down_f * up_a, 0.0))
    return estimate, lower, upper


def newcombe_limits(counts: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`newcombe_paired_interval` for many tables at once: (delta, lower, upper) arrays, counts (..., 4)."""
    return newcombe_limits_at(np.asarray(counts, dtype=np.int64), z_value(confidence))


def mover_mean_limits(estimate: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, ...]:
    """MOVER limits of the mean over the last axis (Zou & Donner 2008), weights 1/K."""
    k = estimate.shape[-1]
    mean = estimate.mean(axis=-1)
    down = np.sqrt((((estimate - lower) / k) ** 2).sum(axis=-1))
    up = np.sqrt((((upper - estimate) / k) ** 2).sum(axis=-1))
    return mean, mean - down, mean + up


def table_counts(tables: Sequence[PairedTable]) -> np.ndarray:
    """The tables' counts, (K, 4) in CELLS order; every class needs images."""
    if not tables:
        raise ConfigError("no paired tables: pass one per class")
    empty = [index for index, table in enumerate(tables) if table.n == 0]
    if empty:
        raise DatasetError(f"classes {empty} have no labelled images; every class needs some to bound its recall")
    return np.array([table.counts() for table in tables], dtype=np.int64)


def newcombe_paired_interval(table: PairedTable, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided interval of ``table.delta`` (artifact minus float): Newcombe's square-and-add method 10.

    Wilson score intervals of the two marginal proportions, correlation estimate psi as in the R
    package contingencytables (Fagerland, Lydersen & Laake 2017, ch. 8). That code orients the
    difference as row minus column margin; ours is that table with the artifact as rows.
    """
    counts = table_counts([table])[0]
    _, lower, upper = newcombe_limits_at(counts, z_value(confidence))
    return float(lower), float(upper)


def balanced_accuracy_delta_interval(tables: Sequence[PairedTable], confidence: float = 0.95
                                     ) -> tuple[float, float, float]:
    """(estimate, lower, upper) of the balanced-accuracy delta: per-class Newcombe limits by MOVER."""
    estimate, lower, upper = mover_mean_limits(*newcombe_limits_at(table_counts(tables), z_value(confidence)))
    return float(estimate), float(lower), float(upper)


def escape_rate_delta_interval(table: PairedTable, confidence: float = 0.95) -> tuple[float, float, float]:
    """(estimate, lower, upper) of the escape-rate change on an :func:`escape_table`, > 0 a rise."""
    lower, upper = newcombe_paired_interval(table, confidence)
    return escape_rate_delta(table), -upper, -lower


def mcnemar_exact(table: PairedTable) -> float:
    """One-sided exact McNemar p-value for "the artifact loses" (more float-only than artifact-only).

    Conditional on the discordant pairs, ``float_only ~ Binomial(float_only + artifact_only, 1/2)``
    when neither model is better; p is P(X >= float_only). 1.0 with no discordant pairs.
    """
    return float(mcnemar_p_values(np.asarray(table.float_only), np.asarray(table.artifact_only)))


def mcnemar_p_values(float_only: np.ndarray, artifact_only: np.ndarray) -> np.ndarray:
    """:func:`mcnemar_exact` for arrays of discordant counts."""
    return stats.binom.sf(float_only - 1, float_only + artifact_only, 0.5)  # P(X >= float_only)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion."""
    if n <= 0 or not 0 <= successes <= n:
        raise ConfigError(f"a proportion needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    lower, upper = wilson_limits(np.asarray(successes), np.asarray(n), z_value(confidence))
    return float(lower), float(upper)


def agreement_interval(agree: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of the share of images on which the artifact's call equals the float model's."""
    return wilson_interval(agree, n, confidence)


def new_escape_bound(new_ok_calls: int, float_defect_calls: int, confidence: float = 0.975) -> float:
    """One-sided exact (Clopper-Pearson) upper bound, at ``confidence``, on the new-escape rate.

    The rate is the share of the float model's defect calls that the artifact calls ok. Assumptions:
    the unlabelled images come from the same line as independent draws, and the float model's defect
    calls are right, so each such image is a defect the artifact lets through; reverse flips (the
    artifact catching what the float model passes) are not credited, so this bounds the escape rise.
    """
    if float_defect_calls <= 0 or not 0 <= new_ok_calls <= float_defect_calls:
        raise ConfigError(f"need 0 <= new_ok_calls <= float_defect_calls > 0, got {new_ok_calls}, {float_defect_calls}")
    z_value(confidence)
    interval = stats.binomtest(new_ok_calls, float_defect_calls).proportion_ci(
        confidence_level=2.0 * confidence - 1.0, method="exact")
    return float(interval.high)


def fidelity_drop_bound(per_class_flips: Sequence[int], per_class_counts: Sequence[int],
                        confidence: float = 0.975) -> tuple[float, float]:
    """(estimate, one-sided upper bound at ``confidence``) of the balanced-accuracy drop, as fractions.

    For each float-predicted class the share of its images the artifact predicts otherwise; their
    mean is the balanced-accuracy drop if the float model's calls were the labels (float predictions
    grouped by class standing in for true classes, every disagreement a loss). Per-class one-sided
    Wilson upper limits combined by MOVER. Same-line, independent unlabelled images assumed; every
    class needs float calls.
    """
    flips, counts = np.asarray(per_class_flips, dtype=np.int64), np.asarray(per_class_counts, dtype=np.int64)
    if flips.shape != counts.shape or flips.ndim != 1 or not flips.size:
        raise ConfigError(f"per-class flips and counts must be two lists of one length, "
                          f"got {flips.shape}, {counts.shape}")
    if (counts <= 0).any() or (flips < 0).any() or (flips > counts).any():
        raise DatasetError(f"each class needs float calls and 0 <= flips <= calls; got flips {flips.tolist()} "
                           f"of {counts.tolist()}: collect more unlabelled images or drop the label-free route")
    share = flips / counts
    _, upper = wilson_limits(flips, counts, z_value(2.0 * confidence - 1.0))
    mean, _, bound = mover_mean_limits(share, share, upper)
    return float(mean), float(bound)
