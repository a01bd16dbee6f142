"""What `edge-tl sweep` writes: one row per trial, the best trial within a latency budget, JSON, CSV, the Pareto plot.

A trial's row is what its run recommends (``bench.json``): the artifact, its batch-1 median latency on
the bench's backend, and from its verification record the balanced accuracy, the escape rate and
the verdict; with no recommended artifact, the counts of the run's verdicts say why. The best
trial is the highest balanced accuracy among the trials whose recommended artifact meets the latency
budget (all of them without one), then the faster.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from edge_tl.artifacts import atomic_write_json, atomic_write_text, read_json

SWEEP_JSON, SWEEP_CSV, SWEEP_PNG = "sweep.json", "sweep.csv", "sweep_pareto.png"
ROW_KEYS = ("name", "status", "artifact", "backend", "latency_ms_p50", "balanced_accuracy", "escape_rate",
            "verdict", "verdicts", "seconds", "benched_alone", "run_dir", "error")  # a trial's row; the CSV's columns


def trial_row(name: str, run_dir: Path) -> dict:
    """The row of a finished run: its recommended artifact, latency, balanced accuracy, escape rate, verdict."""
    recommended = read_json(run_dir / "bench.json").get("recommended") or {}
    records = {path.name.removesuffix(".json"): read_json(path) for path in sorted((run_dir / "verify").glob("*.json"))}
    verdicts = Counter(record.get("verdict", "FAIL") for record in records.values())
    artifact = recommended.get("artifact")
    record = records.get(artifact, {}) if artifact else {}
    return {"name": name, "status": "done", "artifact": artifact, "backend": recommended.get("backend"),
            "latency_ms_p50": recommended.get("latency_ms_p50"),
            "balanced_accuracy": record.get("balanced_accuracy", recommended.get("balanced_accuracy")),
            "escape_rate": record.get("escape_rate"), "verdict": record.get("verdict"),
            "verdicts": ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items())),
            "run_dir": str(run_dir)}


def best_trial(rows: list[dict], max_latency_ms: float | None) -> dict | None:
    """The most accurate trial with a recommended artifact within ``max_latency_ms`` (then the fastest)."""
    eligible = [row for row in rows if row.get("artifact") and row.get("latency_ms_p50") is not None
                and row.get("balanced_accuracy") is not None
                and (max_latency_ms is None or row["latency_ms_p50"] <= max_latency_ms)]
    if not eligible:
        return None
    return max(eligible, key=lambda row: (row["balanced_accuracy"], -row["latency_ms_p50"]))


def sweep_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in ROW_KEYS})
    return buffer.getvalue()


def plot_trials(rows: list[dict], best: dict | None, path: Path) -> Path | None:
    """Balanced accuracy vs latency of every trial's recommended artifact, Pareto front joined, the best starred."""
    from edge_tl.plots import LatencyPoint, plot_accuracy_vs_latency

    points = [LatencyPoint(f"{row['name']}: {row['artifact']}", row["latency_ms_p50"], row["balanced_accuracy"],
                           passed=True, verdict=row.get("verdict"))
              for row in rows if row.get("artifact") and row.get("latency_ms_p50") is not None]
    if not points:
        return None
    label = f"{best['name']}: {best['artifact']}" if best else None
    return plot_accuracy_vs_latency(points, path, recommended=label,
                                    title="sweep: each trial's recommended artifact")


def write_sweep(out: Path, record: dict) -> dict:
    """Add the best trial to ``record``; write OUT/sweep.csv, the plot, then OUT/sweep.json (last)."""
    best = best_trial(record["rows"], record.get("max_latency_ms"))
    plot = plot_trials(record["rows"], best, out / SWEEP_PNG)
    record = {**record, "best": best["name"] if best else None, "plot": plot.name if plot else None,
              "failed": [row["name"] for row in record["rows"] if row["status"] == "failed"]}
    atomic_write_text(out / SWEEP_CSV, sweep_csv(record["rows"]))
    atomic_write_json(out / SWEEP_JSON, record)
    return record
