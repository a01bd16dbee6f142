"""The benchmark's records and outputs: rows, bench.json, bench.csv, speed ratios, the recommendation.

:class:`BenchRow` is one (artifact, backend, batch size) measurement and :class:`BenchResult` all of
bench.json; both round-trip through JSON (``to_dict`` / ``from_dict``), and :func:`bench_csv` writes
the rows with ``latency_ms`` spread into columns. :func:`with_ratios` gives each row its speed
relative to the float FP32 ONNX row at the same batch size.

:func:`recommend` picks the fastest artifact (p50 at the smallest batch size, batch 1 by default)
that passed verification and whose own balanced accuracy and escape rate are also within that
verification's gate of the fine-tuned float model: a pruned artifact is verified against the pruned
model, so its gate alone does not bound what pruning lost. PyTorch rows are the reference, not
candidates.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge_tl.artifacts import read_json
from edge_tl.errors import ArtifactError
from edge_tl.verify import POINTS_TOLERANCE

REFERENCE_ARTIFACT = "model.float.fp32.onnx"
LATENCY_KEYS = ("mean", "p50", "p90", "p99", "min", "max")
BENCH_JSON, BENCH_CSV = "bench.json", "bench.csv"


@dataclass(frozen=True)
class BenchRow:
    """One (artifact, backend, batch size) measurement. ``latency_ms``: mean, p50, p90, p99, min and
    max; ``latency_ratio``: the float FP32 ONNX row's p50 over this row's at the same batch size
    (above 1: faster); ``accuracy_source``: where accuracy came from (None: not measured)."""

    artifact: str
    backend: str
    precision: str | None
    stage: str | None
    batch_size: int
    latency_ms: dict[str, float]
    cv: float
    stable: bool
    runs: int
    throughput_ips: float
    size_bytes: int
    params: int | None = None
    macs: int | None = None
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    escape_rate: float | None = None
    accuracy_source: str | None = None
    peak_memory_bytes: int | None = None
    latency_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``to_dict`` with ``latency_ms`` spread into ``latency_ms_mean`` ... ``latency_ms_max`` (CSV)."""
        values = self.to_dict()
        values.update({f"latency_ms_{key}": value for key, value in values.pop("latency_ms").items()})
        return {column: values[column] for column in csv_columns()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BenchRow:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
        unknown = sorted(set(values) - {f.name for f in fields})
        latency = values.get("latency_ms")
        if missing or unknown or not isinstance(latency, Mapping) or set(latency) != set(LATENCY_KEYS):
            raise ArtifactError(f"bench row {values.get('artifact', '?')!r} is malformed (missing {missing}, unknown "
                                f"{unknown}, latency_ms {latency!r}); rerun `edge-tl bench`")
        return cls(**{**values, "latency_ms": {key: float(latency[key]) for key in LATENCY_KEYS}})


def csv_columns() -> list[str]:
    names = [f.name for f in dataclasses.fields(BenchRow)]
    at = names.index("latency_ms")
    return [*names[:at], *(f"latency_ms_{key}" for key in LATENCY_KEYS), *names[at + 1:]]


@dataclass(frozen=True)
class BenchResult:
    """bench.json: the machine, the settings, the rows, what was skipped and why, and the
    recommended artifact (None for a lone artifact)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: tuple[BenchRow, ...]
    skipped: tuple[dict[str, Any], ...] = ()
    recommended: dict[str, Any] | None = None
    resolution: dict[str, Any] | None = None  # edge_tl.resolution_cost: a run at another size than the default

    def to_dict(self) -> dict[str, Any]:
        return {"machine": dict(self.machine), "settings": dict(self.settings),
                "rows": [row.to_dict() for row in self.rows], "skipped": [dict(entry) for entry in self.skipped],
                "recommended": self.recommended, "resolution": self.resolution}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BenchResult:
        if not isinstance(values, Mapping) or not isinstance(values.get("rows"), list):
            raise ArtifactError("bench.json has no list of rows; rerun `edge-tl bench`")
        return cls(dict(values.get("machine", {})), dict(values.get("settings", {})),
                   tuple(BenchRow.from_dict(row) for row in values["rows"]),
                   tuple(dict(entry) for entry in values.get("skipped", [])), values.get("recommended"),
                   values.get("resolution"))


def load_bench(run_dir: str | Path) -> BenchResult:
    """RUN_DIR/bench.json as a BenchResult."""
    return BenchResult.from_dict(read_json(Path(run_dir) / BENCH_JSON))


def with_ratios(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """Rows with ``latency_ratio`` = the float FP32 ONNX row's p50 / the row's p50, per batch size."""
    reference = {row.batch_size: row.latency_ms["p50"] for row in rows
                 if row.artifact == REFERENCE_ARTIFACT and row.backend == "onnxruntime"}
    return [dataclasses.replace(row, latency_ratio=reference[row.batch_size] / row.latency_ms["p50"])
            if row.batch_size in reference else row for row in rows]


def _rejection(row: BenchRow, verdict: dict | None, float_facts: Mapping[str, Any]) -> str | None:
    """Why ``row``'s artifact cannot be recommended, or None when it can."""
    if verdict is None:
        return "not verified; run `edge-tl verify` on it"
    if not verdict["passed"]:
        outcome = verdict.get("verdict", "FAIL")
        if outcome == "INCONCLUSIVE":
            from edge_tl.gate import settle_text

            return f"verification INCONCLUSIVE: {settle_text(verdict)}"
        return "failed verification (FAIL)"
    if row.balanced_accuracy is None:
        return "no validation accuracy"
    drop = 100.0 * (float_facts["balanced_accuracy"] - row.balanced_accuracy)
    if drop > verdict["max_drop"] + POINTS_TOLERANCE:
        return f"balanced accuracy {drop:.2f} points below the fine-tuned float model (gate {verdict['max_drop']})"
    if row.escape_rate is not None and float_facts.get("escape_rate") is not None:
        rise = 100.0 * (row.escape_rate - float_facts["escape_rate"])
        if rise > verdict["max_escape_rise"] + POINTS_TOLERANCE:
            return f"escape rate {rise:+.2f} points above the fine-tuned float model"
    return None


def recommend(rows: Sequence[BenchRow], verdicts: Mapping[str, dict], float_facts: Mapping[str, Any]) -> dict:
    """The fastest artifact at the smallest batch size among those verification let through (see the module doc)."""
    batch_size = min(row.batch_size for row in rows)
    at_batch = [row for row in rows if row.backend != "torch" and row.batch_size == batch_size]
    rejected = {row.artifact: _rejection(row, verdicts.get(row.artifact), float_facts) for row in at_batch}
    candidates = [row for row in at_batch if rejected[row.artifact] is None]
    rejected = {name: reason for name, reason in rejected.items() if reason is not None}
    if not candidates:
        return {"artifact": None, "batch_size": batch_size, "rejected": rejected,
                "reason": "no artifact passed verification within its gate of the fine-tuned float model; "
                          "recalibrate, quantize with QAT or prune less, then verify again"}
    best = min(candidates, key=lambda row: row.latency_ms["p50"])
    versus = f", {best.latency_ratio:.2f}x as fast as {REFERENCE_ARTIFACT}" if best.latency_ratio and (
        best.artifact != REFERENCE_ARTIFACT) else ""
    reason = (f"fastest at batch {batch_size} (p50 {best.latency_ms['p50']:.3f} ms{versus}) of {len(candidates)} "
              f"artifact(s) that passed verification, balanced accuracy {best.balanced_accuracy:.4f} vs "
              f"{float_facts['balanced_accuracy']:.4f} for the fine-tuned float model")
    return {"artifact": best.artifact, "backend": best.backend, "precision": best.precision, "batch_size": batch_size,
            "latency_ms_p50": best.latency_ms["p50"], "latency_ratio": best.latency_ratio,
            "balanced_accuracy": best.balanced_accuracy, "reason": reason, "rejected": rejected}


def bench_csv(rows: Sequence[BenchRow]) -> str:
    """One line per row; ``latency_ms`` flattened into ``latency_ms_mean`` ... ``latency_ms_max``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, csv_columns(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.flat() for row in rows)
    return buffer.getvalue()
