"""The report's figures: accuracy against latency, confusion matrices, per-class recall.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so no global backend or figure registry is touched and nothing needs a display. Every
PNG is written through :func:`edge_tl.artifacts.atomic_output_path`. The functions take plain
numbers, not run directories: :mod:`edge_tl.report` decides what to draw.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edge_tl.artifacts import atomic_output_path

DPI = 120
# the file names write_run_plots gives figures; nothing else in a plots folder is the report's
PARETO_PNG = "accuracy_vs_latency.png"
RECALL_PNG = "per_class_recall.png"
_STAGE_NAME_CHARS = "A-Za-z0-9_.-"  # a stage name's other characters become "_" in confusion_<stage>_int8.png
_RUN_PLOT_NAME = re.compile(
    rf"{re.escape(PARETO_PNG)}|{re.escape(RECALL_PNG)}|confusion_[{_STAGE_NAME_CHARS}]*_int8\.png")
_FLOAT_COLOR = "#4d4d4d"
_SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class LatencyPoint:
    """One (artifact, backend) at batch 1: median latency and balanced accuracy in [0, 1]."""

    label: str
    latency_ms: float
    balanced_accuracy: float
    passed: bool | None = None
    interval: tuple[float, float] | None = None  # the verify record's confidence interval of the balanced accuracy
    verdict: str | None = None  # PASS, FAIL or INCONCLUSIVE


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points that no other point dominates, fastest first.

    A point is dominated when another one is at least as fast and at least as accurate and
    strictly better in one of the two. Identical points do not dominate each other.
    """
    front = []
    for index, (latency, accuracy) in enumerate(points):
        dominated = any(
            other_latency <= latency and other_accuracy >= accuracy
            and (other_latency < latency or other_accuracy > accuracy)
            for other, (other_latency, other_accuracy) in enumerate(points) if other != index
        )
        if not dominated:
            front.append(index)
    return sorted(front, key=lambda index: (points[index][0], -points[index][1], index))


def _text(value: str) -> str:
    """A label matplotlib shows literally: a ``$`` would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_output_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def plot_accuracy_vs_latency(points: Sequence[LatencyPoint], path: str | os.PathLike, recommended: str | None = None,
                             title: str = "balanced accuracy vs batch-1 latency") -> Path:
    """Every point labelled; the Pareto front ringed and joined, failed verifications hollow, the point whose
    label is ``recommended`` starred."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    if not points:
        raise ValueError("plot_accuracy_vs_latency needs at least one point")
    figure = _new_figure(7.5, 4.8)
    axes = figure.add_subplot()
    front = pareto_front([(point.latency_ms, point.balanced_accuracy) for point in points])
    latencies = [point.latency_ms for point in points]
    log_scale = min(latencies) > 0 and max(latencies) / min(latencies) > 8
    middle = math.sqrt(min(latencies) * max(latencies)) if log_scale else (min(latencies) + max(latencies)) / 2
    below = _labels_below(points)
    for index, point in enumerate(points):
        color = _SERIES_COLORS[index % len(_SERIES_COLORS)]
        x, y = point.latency_ms, 100 * point.balanced_accuracy
        if point.interval is not None:  # the verification's confidence interval of the balanced accuracy
            low, high = (100 * bound for bound in point.interval)
            axes.errorbar([x], [y], yerr=[[max(y - low, 0.0)], [max(high - y, 0.0)]], fmt="none", ecolor=color,
                          elinewidth=1.0, capsize=3, alpha=0.7, zorder=2)
        axes.scatter([x], [y], s=60, zorder=3, facecolors="none" if point.passed is False else color,
                     edgecolors=color, linewidths=1.8, linestyle="--" if point.verdict == "INCONCLUSIVE" else "-")
        right_side = x > middle and len(points) > 1
        axes.annotate(_text(point.label), (x, y), fontsize=7, xytext=(-7 if right_side else 7, -11 if index in below
                                                                      else 5),
                      textcoords="offset points", ha="right" if right_side else "left")
    axes.scatter([points[i].latency_ms for i in front], [100 * points[i].balanced_accuracy for i in front], s=260,
                 zorder=2, facecolors="none", edgecolors="black", linewidths=1.0)
    axes.plot([points[i].latency_ms for i in front], [100 * points[i].balanced_accuracy for i in front],
              color="black", linestyle="--", linewidth=1.0, zorder=1)
    starred = [point for point in points if point.label == recommended]
    axes.scatter([p.latency_ms for p in starred], [100 * p.balanced_accuracy for p in starred], s=140, zorder=4,
                 marker="*", color="gold", edgecolors="black", linewidths=0.8)
    if log_scale:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
    axes.margins(x=0.12, y=0.12)
    axes.set_xlabel("batch-1 latency, median (ms)")
    axes.set_ylabel("balanced accuracy (%)")
    axes.set_title(_text(title))
    axes.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color="gray", label="verified, or not verifiable"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="gray",
                      label="FAIL or INCONCLUSIVE (bars: confidence interval)"),
               Line2D([], [], marker="o", markersize=13, markerfacecolor="none", color="black", linestyle="--",
                      linewidth=1.0, label="Pareto front")]
    if starred:
        handles.append(Line2D([], [], marker="*", markersize=11, linestyle="", color="gold", markeredgecolor="black",
                              label="recommended"))
    axes.legend(handles=handles, fontsize=7, loc="best")
    return _save(figure, path)


def _labels_below(points: Sequence[LatencyPoint]) -> set[int]:
    """Indices whose label goes under the marker: every other one of a run of points at about the same accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i].balanced_accuracy, points[i].latency_ms))
    below, previous = set(), None
    for index in order:
        if previous is not None and abs(points[index].balanced_accuracy - points[previous].balanced_accuracy) < 0.015:
            if previous not in below:
                below.add(index)
        previous = index
    return below


def _draw_confusion(axes, matrix: np.ndarray, classes: Sequence[str], title: str) -> None:
    support = matrix.sum(axis=1, keepdims=True)
    recall = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=float), where=support > 0)
    axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_text(name) for name in classes]
    axes.set_xticks(range(len(classes)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(classes)), labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(_text(title), fontsize=9)
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center", fontsize=8,
                      color="white" if recall[row, column] > 0.6 else "black")


def plot_confusion_pair(float_matrix: Sequence[Sequence[int]], artifact_matrix: Sequence[Sequence[int]],
                        classes: Sequence[str], path: str | os.PathLike, float_title: str,
                        artifact_title: str) -> Path:
    """Two confusion matrices side by side (counts written, cells shaded by row recall)."""
    left, right = np.asarray(float_matrix), np.asarray(artifact_matrix)
    expected = (len(classes), len(classes))
    if left.shape != expected or right.shape != expected:
        raise ValueError(f"confusion matrices {left.shape} and {right.shape} do not match {len(classes)} classes")
    side = max(3.2, 0.55 * len(classes) + 1.8)
    figure = _new_figure(2 * side + 0.4, side)
    first, second = figure.subplots(1, 2)
    _draw_confusion(first, left, classes, float_title)
    _draw_confusion(second, right, classes, artifact_title)
    return _save(figure, path)


def plot_per_class_recall(classes: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
                          path: str | os.PathLike, title: str = "per-class recall") -> Path:
    """Grouped bars: one group per class, one bar per series (the float model first)."""
    if not series:
        raise ValueError("plot_per_class_recall needs at least one series")
    figure = _new_figure(min(14.0, max(6.0, 0.3 * len(classes) * len(series) + 2.5)), 4.6)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    positions = np.arange(len(classes))
    for index, (label, recalls) in enumerate(series):
        if len(recalls) != len(classes):
            raise ValueError(f"series {label!r} has {len(recalls)} recalls for {len(classes)} classes")
        color = _FLOAT_COLOR if index == 0 else _SERIES_COLORS[(index - 1) % len(_SERIES_COLORS)]
        axes.bar(positions + (index - (len(series) - 1) / 2) * width, [100 * value for value in recalls],
                 width=width, color=color, label=_text(label))
    axes.set_xticks(positions, [_text(name) for name in classes], rotation=30 if len(classes) > 6 else 0,
                    ha="right" if len(classes) > 6 else "center")
    axes.set_ylim(0, 105)
    axes.set_ylabel("recall (%)")
    axes.set_title(_text(title))
    axes.grid(True, axis="y", alpha=0.3)
    figure.legend(fontsize=7, loc="outside lower center", ncol=min(len(series), 4))
    return _save(figure, path)


# ----------------------------------------------------------------------------- from run records
def median_latency_ms(row: dict) -> float | None:
    """A bench row's median latency (``latency_ms.p50``), or None when it is missing or not positive."""
    latency = row.get("latency_ms")
    value = latency.get("p50") if isinstance(latency, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


_IMPLIED_BACKEND = {".onnx": "onnxruntime", ".engine": "tensorrt"}


def _artifact_name(record: dict) -> str:
    """The file name of a bench row's or verify record's ``artifact``."""
    return Path(str(record.get("artifact"))).name


def point_label(row: dict) -> str:
    """The artifact's file name, with its backend when the name does not already imply it."""
    name, backend = Path(str(row.get("artifact", "?"))).name, row.get("backend", "?")
    implied = _IMPLIED_BACKEND.get(Path(name).suffix) == backend or (backend == "torch" and "pytorch" in name)
    return name if implied else f"{name} [{backend}]"


def latency_points(bench_rows: Sequence[dict], verifications: Sequence[dict]) -> list[LatencyPoint]:
    """Batch-1 bench rows with a latency and a balanced accuracy; ``passed``, the verdict and the accuracy
    interval from the artifact's verify record."""
    records = {_artifact_name(record): record for record in verifications}
    points = []
    for row in bench_rows:
        latency, accuracy = median_latency_ms(row), row.get("balanced_accuracy")
        if row.get("batch_size") == 1 and latency and isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
            record = records.get(_artifact_name(row), {})
            points.append(LatencyPoint(point_label(row), latency, float(accuracy), record.get("passed"),
                                       accuracy_interval(record), record.get("verdict")))
    return points


def accuracy_interval(record: dict) -> tuple[float, float] | None:
    """The artifact's balanced accuracy interval from its verify record: the float model's balanced
    accuracy minus the drop's (labelled) confidence interval, within [0, 1] (None for records without
    statistics)."""
    reference = record.get("float_balanced_accuracy")
    for interval in (record.get("statistics") or {}).get("intervals", []):
        if interval.get("quantity") == "balanced_accuracy_drop" and isinstance(reference, (int, float)):
            low, high = reference - interval["upper_points"] / 100, reference - interval["lower_points"] / 100
            return max(low, 0.0), min(high, 1.0)  # a balanced accuracy lies in [0, 1]
    return None


def recall_from_confusion(matrix: Sequence[Sequence[int]]) -> list[float]:
    """Per-class recall (rows are true classes); NaN for a class without samples."""
    return [row[index] / sum(row) if sum(row) else math.nan for index, row in enumerate(matrix)]


def recall_series(classes: Sequence[str], float_metrics: dict | None,
                  verifications: Sequence[dict]) -> list[tuple[str, list[float]]]:
    """(label, per-class recalls): the fine-tuned float model, then every verified artifact."""
    series = []
    per_class = (float_metrics or {}).get("per_class") or {}
    if all(name in per_class for name in classes) and per_class:
        series.append(("fine-tuned (float)", [float(per_class[name]["recall"]) for name in classes]))
    for record in verifications:
        matrix = record.get("confusion_matrix")
        if isinstance(matrix, list) and len(matrix) == len(classes):
            series.append((_artifact_name(record), recall_from_confusion(matrix)))
    return series


def _int8_record_per_stage(verifications: Sequence[dict]) -> dict[str, dict]:
    chosen: dict[str, dict] = {}
    for record in sorted(verifications, key=lambda r: not str(r.get("artifact", "")).endswith(".onnx")):
        matrices = record.get("float_confusion_matrix") and record.get("confusion_matrix")
        if record.get("precision") == "int8" and matrices:
            chosen.setdefault(str(record.get("stage", "unknown")), record)
    return chosen


def write_run_plots(plots_dir: str | os.PathLike, classes: Sequence[str], float_metrics: dict | None,
                    verifications: Sequence[dict], bench: dict | None) -> dict[str, tuple[Path, str]]:
    """Every figure the run's records allow: key -> (PNG path, caption). Keys: pareto, confusion_<stage>, recall."""
    plots_dir = Path(plots_dir)
    written = {}
    points = latency_points((bench or {}).get("rows") or [], verifications)
    if points:
        recommended = (bench or {}).get("recommended") or {}
        path = plot_accuracy_vs_latency(points, plots_dir / PARETO_PNG,
                                        point_label(recommended) if recommended.get("artifact") else None)
        written["pareto"] = (path, "Balanced accuracy against batch-1 median latency; the Pareto front is ringed "
                                   "and joined, hollow markers failed verification.")
    for stage, record in _int8_record_per_stage(verifications).items():
        name = _artifact_name(record)
        safe_stage = re.sub(f"[^{_STAGE_NAME_CHARS}]", "_", stage)
        path = plot_confusion_pair(record["float_confusion_matrix"], record["confusion_matrix"],
                                   record.get("classes") or classes, plots_dir / f"confusion_{safe_stage}_int8.png",
                                   f"float PyTorch model, {stage} stage", name)
        written[f"confusion_{safe_stage}"] = (path, f"Confusion matrices on the validation split, {stage} stage: "
                                                    f"float model (left) and {name} (right); rows are true classes.")
    series = recall_series(classes, float_metrics, verifications)
    if series:
        path = plot_per_class_recall(classes, [(label, [0.0 if math.isnan(v) else v for v in values])
                                               for label, values in series], plots_dir / RECALL_PNG)
        written["recall"] = (path, "Per-class recall on the validation split: the float model and each artifact.")
    return written


def remove_stale_run_plots(plots_dir: str | os.PathLike, keep: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the PNGs in ``plots_dir`` named as :func:`write_run_plots` names figures but not in ``keep``
    (figures an earlier report drew and this one does not); other files are left alone. Returns the deleted paths."""
    kept = {Path(path).name for path in keep}
    stale = sorted(path for path in Path(plots_dir).glob("*.png")
                   if _RUN_PLOT_NAME.fullmatch(path.name) and path.name not in kept and not path.is_dir())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
