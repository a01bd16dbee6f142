"""Paired statistics for a three-verdict verification gate: PASS, FAIL or INCONCLUSIVE.

The float model and the artifact see the same labelled images, so every comparison is paired: a
:class:`PairedTable` counts, for one class (or for the defect images), the images both models get
right, the ones only the float model gets right (``float_only``: what the artifact lost), the ones
only the artifact gets right and the ones both get wrong. Deltas are artifact minus float, as
fractions; the gate's records (:class:`Interval`, :class:`GateDecision`) are in percentage points,
as losses: ``drop`` is minus the balanced-accuracy delta, ``rise`` the escape-rate increase.

Methods. Each class's recall delta gets Newcombe's (1998) square-and-add interval (method 10) on
Wilson score intervals of the two marginal proportions, with the correlation estimate of the
``contingencytables`` R package (Fagerland, Lydersen & Laake 2017, ch. 8); the balanced-accuracy
delta (mean over classes) combines them by MOVER (Zou & Donner 2008). The escape-rate rise is the
same interval on :func:`escape_table`. :func:`mcnemar_exact` is the one-sided exact McNemar test.

Decision (:func:`decide`). Intervals are two-sided at ``1 - alpha``, so each bound errs on its own
side with probability about ``alpha / 2``, and every route below is a one-sided test at that level.
PASS needs both upper bounds (drop, rise) within the margins: an artifact worse than either margin
passes at most ``alpha / 2`` of the time. FAIL needs a lower bound beyond its margin; at a zero
escape margin the exact McNemar test (``p < alpha / 2``) is the escape route instead, and PASS then
needs an upper bound of the rise at or below zero: a significant fall in escapes. Label-free evidence
(:class:`LabelFreeCounts`: unlabelled images, the float model's calls as reference) gives a second
way to PASS, so Bonferroni splits the PASS error: labelled intervals at ``1 - alpha / 2`` (two-sided),
label-free bounds one-sided at ``1 - alpha / 4``. FAIL wins over PASS when the routes disagree.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np
from scipy import stats

from edge_tl.errors import ConfigError
from edge_tl.paired_counts import LabelFreeCounts, PairedTable
from edge_tl.paired_intervals import (
    agreement_interval, fidelity_drop_bound, mcnemar_p_values, mover_mean_limits, new_escape_bound, newcombe_limits_at,
    table_counts, z_value)

SETTLE_GRID_RATIO = 1.02  # images_to_settle tries factors 1.02, 1.02**2, ... up to max_factor


class Verdict(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True)
class Interval:
    """One interval or bound of a gate record, in percentage points."""

    quantity: str
    estimate_points: float
    lower_points: float | None  # None for a one-sided upper bound
    upper_points: float
    method: str
    confidence: float  # two-sided, or one-sided where lower_points is None


@dataclass(frozen=True)
class GateDecision:
    """The verdict with everything behind it; ``to_dict`` is the JSON record."""

    verdict: Verdict
    routes: tuple[str, ...]  # the evidence that decided (empty when INCONCLUSIVE)
    reasons: tuple[str, ...]
    intervals: tuple[Interval, ...]
    mcnemar_p: float | None
    alpha: float
    max_drop: float
    max_escape_rise: float
    bonferroni: bool

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        return {**record, "verdict": self.verdict.value, "routes": list(self.routes),
                "reasons": list(self.reasons), "intervals": [dict(i) for i in record["intervals"]]}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> GateDecision:
        return cls(**{**record, "verdict": Verdict(record["verdict"]), "routes": tuple(record["routes"]),
                      "reasons": tuple(record["reasons"]),
                      "intervals": tuple(Interval(**i) for i in record["intervals"])})


def _check_gate(max_drop: float, max_escape_rise: float, alpha: float) -> None:
    for label, value in (("max_drop", max_drop), ("max_escape_rise", max_escape_rise)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{label} {value!r} must be a number of percentage points >= 0, e.g. 1.0")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha {alpha!r} must lie strictly between 0 and 1, e.g. 0.05")


def _label_free_bounds(label_free: LabelFreeCounts | None, with_escape: bool, confidence: float
                       ) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """((estimate, upper) of the drop, (estimate, upper) of the new-escape rate), in points."""
    if label_free is None:
        return None, None
    estimate, upper = fidelity_drop_bound(label_free.per_class_flips, label_free.per_class_counts, confidence)
    drop = (100.0 * estimate, 100.0 * upper)
    new_ok, defect_calls = label_free.new_ok_calls, label_free.float_defect_calls
    if not with_escape or new_ok is None or defect_calls is None:
        return drop, None
    estimate = new_ok / max(defect_calls, 1)
    upper = new_escape_bound(new_ok, defect_calls, confidence)
    return drop, (100.0 * estimate, 100.0 * upper)


def _gate(class_counts: np.ndarray, escape_counts: np.ndarray | None, max_drop: float, max_escape_rise: float,
          alpha: float, label_free: LabelFreeCounts | None) -> dict[str, Any]:
    """Every bound and route outcome, vectorised over the leading axes of the counts."""
    _check_gate(max_drop, max_escape_rise, alpha)
    confidence = 1.0 - alpha / 2.0 if label_free is not None else 1.0 - alpha
    z = z_value(confidence)
    per_class = newcombe_limits_at(class_counts, z)
    estimate, lower, upper = mover_mean_limits(*per_class)
    out: dict[str, Any] = {"confidence": confidence, "per_class": per_class,
                           "drop": (-100.0 * estimate, -100.0 * upper, -100.0 * lower)}
    lf_drop, lf_rise = _label_free_bounds(label_free, escape_counts is not None, 1.0 - alpha / 4.0)
    out.update(label_free_confidence=1.0 - alpha / 4.0, label_free_drop=lf_drop, label_free_rise=lf_rise)
    out["fail_drop"] = out["drop"][1] > max_drop
    out["pass_drop_labelled"] = out["drop"][2] <= max_drop
    out["pass_drop_label_free"] = lf_drop is not None and lf_drop[1] <= max_drop
    out["rise"] = out["mcnemar_p"] = None
    out["fail_rise"], out["pass_rise_labelled"], out["pass_rise_label_free"] = False, True, False
    if escape_counts is not None:
        estimate, lower, upper = newcombe_limits_at(escape_counts, z)
        out["rise"] = (-100.0 * estimate, -100.0 * upper, -100.0 * lower)
        out["mcnemar_p"] = mcnemar_p_values(escape_counts[..., 1], escape_counts[..., 2])
        # at a zero margin the exact test of "no rise" replaces the approximate lower bound
        out["fail_rise"] = (out["mcnemar_p"] < alpha / 2.0 if max_escape_rise == 0
                            else out["rise"][1] > max_escape_rise)
        out["pass_rise_labelled"] = out["rise"][2] <= max_escape_rise
        out["pass_rise_label_free"] = lf_rise is not None and lf_rise[1] <= max_escape_rise
    failed = out["fail_drop"] | out["fail_rise"]
    passed = ((out["pass_drop_labelled"] | out["pass_drop_label_free"])
              & (out["pass_rise_labelled"] | out["pass_rise_label_free"]))
    out["verdict"] = np.where(failed, Verdict.FAIL.value,
                              np.where(passed, Verdict.PASS.value, Verdict.INCONCLUSIVE.value))
    return out


def gate_verdicts(class_counts: np.ndarray, escape_counts: np.ndarray | None, max_drop: float,
                  max_escape_rise: float, alpha: float = 0.05, label_free: LabelFreeCounts | None = None
                  ) -> np.ndarray:
    """:func:`decide`'s verdicts for many samples at once: counts (..., K, 4) and (..., 4) in CELLS order."""
    class_counts = np.asarray(class_counts, dtype=np.int64)
    if class_counts.ndim < 2 or class_counts.shape[-1] != 4 or (class_counts.sum(axis=-1) == 0).any():
        raise ConfigError(f"class counts must have shape (..., classes, 4) with images in every class, "
                          f"got shape {class_counts.shape}")
    escape = None if escape_counts is None else np.asarray(escape_counts, dtype=np.int64)
    if escape is not None and (escape.shape != class_counts.shape[:-2] + (4,) or (escape.sum(axis=-1) == 0).any()):
        raise ConfigError(f"escape counts must have shape {class_counts.shape[:-2] + (4,)} with defects in every "
                          f"sample, got shape {escape.shape}")
    return _gate(class_counts, escape, max_drop, max_escape_rise, alpha, label_free)["verdict"]


def _reasons(g: dict[str, Any], escape: bool, max_drop: float, max_escape_rise: float
             ) -> tuple[list[str], list[str], list[str]]:
    """(reasons, routes that fail, routes that pass) for one sample's :func:`_gate` output."""
    reasons, failing, passing = [], [], []
    criteria = [("drop", "balanced-accuracy drop", max_drop, "labelled drop", "label-free drop")]
    if escape:
        criteria.append(("rise", "escape-rate rise", max_escape_rise, "labelled escape rise", "label-free new escapes"))
    for key, name, margin, labelled, label_free in criteria:
        lower, upper = float(g[key][1]), float(g[key][2])
        text = f"{name} interval [{lower:.2f}, {upper:.2f}] points vs a {margin:.2f}-point margin"
        if g[f"fail_{key}"] and key == "rise" and margin == 0:
            failing.append("mcnemar escapes")
            reasons.append(f"{text}: more defects lost than gained, exact McNemar p = {float(g['mcnemar_p']):.4g}")
        elif g[f"fail_{key}"]:
            failing.append(labelled)
            reasons.append(f"{text}: the lower bound is beyond the margin")
        elif g[f"pass_{key}_labelled"] or g[f"pass_{key}_label_free"]:
            route, bound = (labelled, upper) if g[f"pass_{key}_labelled"] else (label_free, g[f"label_free_{key}"][1])
            passing.append(route)
            reasons.append(f"{text}: within the margin by the {route} upper bound {bound:.2f}")
        elif key == "rise" and margin == 0:
            reasons.append(f"{text}: no significant loss (McNemar p = {float(g['mcnemar_p']):.4g}), but a zero "
                           "margin passes only on a significant fall in escapes; a positive margin can settle it")
        else:
            reasons.append(f"{text}: undecided, the interval straddles the margin")
    return reasons, failing, passing


def decide(class_tables: Sequence[PairedTable], escape: PairedTable | None, max_drop: float,
           max_escape_rise: float, alpha: float = 0.05, label_free: LabelFreeCounts | None = None) -> GateDecision:
    """PASS, FAIL or INCONCLUSIVE from the per-class tables, the escape table (None without an ok class)
    and optional label-free counts, with margins in points; every interval is computed here, at the
    levels the module docstring gives, so the record's confidences are the ones the verdict used."""
    counts = table_counts(class_tables)
    escape_counts = None if escape is None else table_counts([escape])[0]
    if label_free is not None and len(label_free.per_class_counts) != len(class_tables):
        raise ConfigError(f"label-free counts cover {len(label_free.per_class_counts)} classes, "
                          f"the labelled tables {len(class_tables)}")
    g = _gate(counts, escape_counts, max_drop, max_escape_rise, alpha, label_free)
    verdict = Verdict(str(g["verdict"]))
    reasons, failing, passing = _reasons(g, escape is not None, max_drop, max_escape_rise)
    routes = {Verdict.FAIL: failing, Verdict.PASS: passing}.get(verdict, [])
    conf, method = g["confidence"], "newcombe square-and-add (wilson)"
    drop, rise = [float(v) for v in g["drop"]], g["rise"]
    intervals = [Interval("balanced_accuracy_drop", drop[0], drop[1], drop[2], f"{method}, mover mean of classes",
                          conf)]
    for k, (est, lo, hi) in enumerate(zip(*g["per_class"])):
        intervals.append(Interval(f"recall_drop[{k}]", -100.0 * float(est), -100.0 * float(hi), -100.0 * float(lo),
                                  method, conf))
    if escape is not None:
        intervals.append(Interval("escape_rate_rise", float(rise[0]), float(rise[1]), float(rise[2]), method, conf))
    if label_free is not None:
        lf_conf = g["label_free_confidence"]
        bonferroni = "; Bonferroni with the labelled route"
        intervals.append(Interval("label_free_drop", g["label_free_drop"][0], None, g["label_free_drop"][1],
                                  "wilson per float-predicted class, mover mean, one-sided" + bonferroni, lf_conf))
        if g["label_free_rise"] is not None:
            intervals.append(Interval("label_free_new_escape", g["label_free_rise"][0], None, g["label_free_rise"][1],
                                      "clopper-pearson, one-sided" + bonferroni, lf_conf))
        agree, total = label_free.agreement
        lower, upper = agreement_interval(agree, total, conf)
        intervals.append(Interval("label_free_agreement", 100.0 * agree / total, 100.0 * lower, 100.0 * upper,
                                  "wilson", conf))
        reasons.append(f"label-free evidence used: labelled intervals at {conf:.4g} two-sided and label-free bounds "
                       f"at {lf_conf:.4g} one-sided (Bonferroni over the two ways to PASS), float calls as reference")
    p = None if g["mcnemar_p"] is None else float(g["mcnemar_p"])
    return GateDecision(verdict, tuple(routes), tuple(reasons), tuple(intervals), p, float(alpha),
                        float(max_drop), float(max_escape_rise), label_free is not None)


@dataclass(frozen=True)
class Settlement:
    """How many more labelled images would settle an INCONCLUSIVE gate if they looked like these."""

    factor: float | None  # None: not settled by max_factor times the images
    verdict: Verdict | None  # the verdict at that factor
    additional_images_per_class: tuple[int, ...] | None
    additional_defect_images: int | None
    previous_factor: float | None  # the grid point below, still INCONCLUSIVE


def images_to_settle(class_tables: Sequence[PairedTable], escape: PairedTable | None, max_drop: float,
                     max_escape_rise: float, alpha: float = 0.05, label_free: LabelFreeCounts | None = None,
                     max_factor: float = 100.0) -> Settlement:
    """Scale every labelled table by a common factor k (counts times k, rounded: the observed
    proportions, discordance included, held fixed) and find the smallest k on the grid 1.02, 1.02**2,
    ... up to ``max_factor`` at which the verdict is no longer INCONCLUSIVE; ``previous_factor`` is the
    grid point below. A projection, not a power calculation: new images like these would settle it
    about half the time. With no discordance the intervals still shrink with n, so a positive margin
    is reached; an observed loss exactly at the margin is not (factor None), nor is a zero escape
    margin with no observed change in escapes. Label-free counts stay as given.
    """
    counts = table_counts(class_tables)
    escape_counts = None if escape is None else table_counts([escape])[0]
    now = decide(class_tables, escape, max_drop, max_escape_rise, alpha, label_free).verdict
    if now is not Verdict.INCONCLUSIVE:
        return Settlement(1.0, now, (0,) * len(class_tables), 0 if escape is not None else None, None)
    steps = math.ceil(math.log(max_factor) / math.log(SETTLE_GRID_RATIO))
    factors = np.minimum(SETTLE_GRID_RATIO ** np.arange(1, steps + 1), max_factor)
    scaled = np.rint(counts[None] * factors[:, None, None]).astype(np.int64)
    scaled_escape = None if escape_counts is None else np.rint(escape_counts[None] * factors[:, None]).astype(np.int64)
    verdicts = _gate(scaled, scaled_escape, max_drop, max_escape_rise, alpha, label_free)["verdict"]
    settled = np.flatnonzero(verdicts != Verdict.INCONCLUSIVE.value)
    if not settled.size:
        return Settlement(None, None, None, None, None)
    index = int(settled[0])
    factor = float(factors[index])
    extra = tuple(math.ceil((factor - 1.0) * table.n - 1e-9) for table in class_tables)
    extra_defects = None if escape is None else math.ceil((factor - 1.0) * escape.n - 1e-9)
    return Settlement(factor, Verdict(str(verdicts[index])), extra, extra_defects,
                      float(factors[index - 1]) if index else 1.0)


def defect_images_for_pass(max_escape_rise: float, flip_rate: float, alpha: float = 0.05,
                           power: float | None = None, max_images: int = 100_000) -> int | None:
    """Defect images the escape criterion needs for a PASS, or None if none up to ``max_images``.

    The artifact lets through ``flip_rate`` of the defects the float model catches and catches none it
    misses; the float model catches every defect (so the table is ``(n - x, x, 0, 0)``). Without
    ``power``: the n from which the expected table (x = round(flip_rate * n)) passes, for it and every
    larger n. With ``power``: the n from which x ~ Binomial(n, flip_rate) passes with at least that
    probability. Counts are discrete, so a few smaller n may pass too.
    """
    _check_gate(0.0, max_escape_rise, alpha)
    n = np.arange(1, max_images + 1, dtype=np.int64)
    z = z_value(1.0 - alpha)

    def passes(flips: np.ndarray) -> np.ndarray:
        flips = np.clip(flips, 0, n)
        _, lower, _ = newcombe_limits_at(np.stack([n - flips, flips, 0 * n, 0 * n], axis=-1), z)
        return -100.0 * lower <= max_escape_rise

    if power is None:
        ok = passes(np.rint(flip_rate * n).astype(np.int64))
    else:
        low, high = np.full_like(n, -1), n + 1  # passes(low) is taken as true, passes(high) as false
        while (high - low > 1).any():  # the rise bound grows with the flips: bisect the most that pass
            middle = (low + high) // 2
            good = passes(middle) & (middle <= n)
            low, high = np.where(good, middle, low), np.where(good, high, middle)
        ok = stats.binom.cdf(low, n, flip_rate) >= power
    if not ok[-1]:
        return None
    failing = np.flatnonzero(~ok)  # the sawtooth of rounding: report the n from which every larger n passes
    return int(n[failing[-1] + 1]) if failing.size else 1
