"""The benchmark stage: latency, throughput, size, cost and accuracy of every artifact of a run.

``benchmark(run_dir, BenchConfig(...))`` times the float PyTorch model, the pruned one when
``RUN_DIR/pruned`` exists, every ``RUN_DIR/export/*.onnx`` in ONNX Runtime (CPU provider) and every
``*.engine`` in TensorRT when it is importable, at each batch size, and writes ``RUN_DIR/bench.json``
and ``RUN_DIR/bench.csv`` atomically. ``benchmark_artifact(path, cfg)`` times a lone ``.onnx`` or
``.engine`` file (no run: accuracy, params and MACs are None) and writes nothing.

Each row gets a fresh runner and is timed by :func:`edge_tl.machine.time_inference` on a seeded
standard-normal batch of the artifact's input shape and dtype; a row that has not settled within
``min_time_s`` has ``stable: false`` and is kept, never hidden. PyTorch and ONNX Runtime use
``threads`` intra-op threads (default 1: one edge CPU core, and comparable on a shared machine).
``peak_memory_bytes`` is :func:`edge_tl.machine.peak_rss_growth` over loading, warming up and
timing the row's model; each model runs once, unmeasured, before its first row, so imports and
one-time runtime set-up are not charged to that row.

Accuracy: ``RUN_DIR/verify/<artifact>.json`` when it covers the validation split and its
``artifact_sha256`` matches the file; otherwise :func:`edge_tl.verify.artifact_predictions` runs the
artifact on the validation split with verify's own loading, preprocessing and batching. PyTorch
rows take their stage's ``metrics.json``. The rows, bench.json, bench.csv and the recommended
artifact are :mod:`edge_tl.bench_records`' (its names are re-exported here).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from edge_tl.artifacts import atomic_write_json, atomic_write_text, read_json, sha256_file
from edge_tl.bench_records import (BENCH_CSV, BENCH_JSON, LATENCY_KEYS, REFERENCE_ARTIFACT, BenchResult, BenchRow,
                                   bench_csv, csv_columns, load_bench, recommend, with_ratios)
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError, DatasetError
from edge_tl.machine import (coefficient_of_variation, latency_stats, machine_record, peak_rss_growth,
                             time_inference, torch_threads, unavailable_reason)
from edge_tl.runners.base import Runner, TensorSpec

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BENCH_CSV", "BENCH_JSON", "LATENCY_KEYS", "REFERENCE_ARTIFACT", "SUFFIX_BACKENDS",
           "BenchConfig", "BenchResult", "BenchRow", "bench_csv", "bench_table", "benchmark", "benchmark_artifact",
           "csv_columns", "load_bench", "recommend", "unavailable_reason", "validate_config", "with_ratios"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
SUFFIX_BACKENDS = {".onnx": "onnxruntime", ".engine": "tensorrt"}


@dataclass(frozen=True)
class BenchConfig:
    """What to time and for how long. ``min_time_s`` is each row's budget of timed runs; a row has
    settled when the coefficient of variation is at most ``target_cv`` after ``min_runs`` runs;
    ``threads`` are the intra-op threads of PyTorch and ONNX Runtime."""

    backends: tuple[str, ...] = BACKENDS
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 10
    min_time_s: float = 2.0
    min_runs: int = 10
    max_runs: int = 10_000
    threads: int = 1
    target_cv: float = 0.05
    seed: int = 0


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_config(cfg: BenchConfig) -> None:
    """Every check on the settings; runs before any model is loaded."""
    unknown = [name for name in cfg.backends if name not in BACKENDS]
    if not cfg.backends or unknown:
        raise ConfigError(f"--backends {','.join(map(str, cfg.backends)) or '(none)'}: unknown {unknown}; "
                          f"choose from {','.join(BACKENDS)}")
    if not cfg.batch_sizes or not all(_is_int(size) and size >= 1 for size in cfg.batch_sizes):
        shown = ",".join(map(str, cfg.batch_sizes)) or "(none)"
        raise ConfigError(f"--batch {shown} must list integers >= 1, e.g. 1,8")
    for label, value, low in (("--warmup", cfg.warmup, 0), ("min_runs", cfg.min_runs, 2),
                              ("max_runs", cfg.max_runs, max(cfg.min_runs, 2)), ("--threads", cfg.threads, 1)):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{label} {value!r} must be an integer >= {low}")
    for label, value, example in (("--min-time", cfg.min_time_s, 2.0), ("target_cv", cfg.target_cv, 0.05)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{label} {value!r} must be a number > 0, e.g. {example}")


# --- timing targets ----------------------------------------------------------------------------

class _Unsupported(Exception):
    """A batch size the artifact cannot take; it becomes a skipped entry with this reason."""


@dataclass(frozen=True)
class _Target:
    """One model on one backend, with the row fields that do not depend on the batch size."""

    artifact: str
    backend: str
    make_runner: Callable[[], Runner]
    size_bytes: int
    img_size: int | None
    precision: str | None = None
    stage: str | None = None
    max_batch: int | None = None
    facts: dict = dataclasses.field(default_factory=dict)  # params, macs, accuracy, ... of BenchRow


def _available_backends(requested: Sequence[str], skipped: list[dict]) -> list[str]:
    available = []
    for backend in dict.fromkeys(requested):
        reason = unavailable_reason(backend)
        if reason is None:
            available.append(backend)
        else:
            # the default list names every backend: a missing one is news only when asked for by name
            logger.log(logging.INFO if tuple(requested) == BACKENDS else logging.WARNING,
                       "skipping backend %s: %s", backend, reason)
            skipped.append({"artifact": None, "backend": backend, "batch_size": None, "reason": reason})
    if not available:
        raise BackendUnavailableError("; ".join(entry["reason"] for entry in skipped) + ", or choose another backend")
    return available


def _feed(specs: Mapping[str, TensorSpec], batch_size: int | None, img_size: int | None, max_batch: int | None,
          seed: int) -> dict[str, np.ndarray]:
    """A seeded standard-normal batch per input (``batch_size`` None: the artifact's static batch, or 1)."""
    if batch_size is not None and max_batch is not None and batch_size > max_batch:
        raise _Unsupported(f"the engine takes batches of at most {max_batch}; rebuild it with `edge-tl export MODEL.onnx --format engine --max-batch N`")
    rng, feed = np.random.default_rng(seed), {}
    for name, spec in specs.items():
        fixed = spec.shape[0] if spec.shape else None
        if batch_size is not None and fixed is not None and fixed != batch_size:
            raise _Unsupported(f"static batch {fixed}; re-export with --dynamic-batch to time batch {batch_size}")
        shape = (batch_size or fixed or 1, *(img_size if dim is None else dim for dim in spec.shape[1:]))
        if None in shape:
            raise ArtifactError(f"input {name!r} has dynamic dimensions {spec.shape} and no input_size metadata; "
                                "export it with a fixed input size")
        values = rng.standard_normal(shape) if np.issubdtype(spec.dtype, np.floating) else rng.integers(0, 128, shape)
        feed[name] = values.astype(spec.dtype)
    return feed


def _time_target(target: _Target, cfg: BenchConfig, skipped: list[dict]) -> list[BenchRow]:
    """The target's rows, one per batch size it takes, after one unmeasured load and inference (so
    that imports and one-time runtime set-up are not charged to its first row's memory)."""
    def threads():
        return torch_threads(cfg.threads) if target.backend == "torch" else nullcontext()

    with threads(), target.make_runner() as runner:
        runner.infer(_feed(runner.input_specs(), None, target.img_size, target.max_batch, cfg.seed))
    rows = []
    for batch_size in dict.fromkeys(cfg.batch_sizes):
        with peak_rss_growth() as memory, threads(), target.make_runner() as runner:
            try:
                feed = _feed(runner.input_specs(), batch_size, target.img_size, target.max_batch, cfg.seed)
            except _Unsupported as reason:
                logger.info("skipping %s at batch %d: %s", target.artifact, batch_size, reason)
                skipped.append({"artifact": target.artifact, "backend": target.backend, "batch_size": batch_size,
                                "reason": str(reason)})
                continue
            samples = time_inference(runner, feed, warmup=cfg.warmup, min_runs=cfg.min_runs, max_runs=cfg.max_runs,
                                     min_time_s=cfg.min_time_s, target_cv=cfg.target_cv)
        stats, cv = latency_stats(samples), coefficient_of_variation(samples)
        rows.append(BenchRow(target.artifact, target.backend, target.precision, target.stage, batch_size, stats, cv,
                             len(samples) >= cfg.min_runs and cv <= cfg.target_cv, len(samples),
                             batch_size * 1000.0 / stats["mean"], target.size_bytes,
                             peak_memory_bytes=memory["bytes"], **target.facts))
        logger.info("%s on %s, batch %d: p50 %.3f ms, cv %.3f, %d runs%s", target.artifact, target.backend,
                    batch_size, stats["p50"], cv, len(samples), "" if rows[-1].stable else " (not settled)")
    return rows


def _time_targets(targets: Sequence[_Target], cfg: BenchConfig, skipped: list[dict]) -> list[BenchRow]:
    rows = [row for target in targets for row in _time_target(target, cfg, skipped)]
    if not rows:
        reasons = "; ".join(f"{s['artifact']} at batch {s['batch_size']}: {s['reason']}" for s in skipped[-3:])
        raise ConfigError(f"nothing could be timed ({reasons or 'no artifacts for the chosen backends'})")
    return with_ratios(rows)


def _artifact_target(path: Path, backend: str, cfg: BenchConfig) -> _Target:
    """An .onnx or .engine file; its metadata gives stage, precision and input size (engines: max batch)."""
    from edge_tl.verify import artifact_metadata

    metadata, max_batch = artifact_metadata(path), None
    if backend == "onnxruntime":
        from edge_tl.runners.onnxruntime_runner import OnnxRuntimeRunner

        make_runner = lambda: OnnxRuntimeRunner(path, intra_op_threads=cfg.threads)  # noqa: E731
    else:
        from edge_tl.runners.tensorrt_runner import TensorRTRunner
        from export.tensorrt_build import manifest_path

        max_batch = int(read_json(manifest_path(path)).get("settings", {}).get("max_batch", 1))
        make_runner = lambda: TensorRTRunner(path)  # noqa: E731
    size = metadata.get("input_size")
    return _Target(path.name, backend, make_runner, path.stat().st_size, int(size[0]) if size else None,
                   metadata.get("precision"), metadata.get("stage"), max_batch)


# --- a run directory's artifacts and their accuracy ---------------------------------------------

def _check_run_dir(run_dir: Path) -> None:
    if run_dir.is_file():
        raise ArtifactError(f"{run_dir} is a file, not a run directory; bench a lone FILE.onnx or FILE.engine instead")
    for name in ("run.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise ArtifactError(f"{run_dir} is not a run directory (no {name}); create one with "
                                f"`edge-tl finetune DATA_DIR --out {run_dir}`")


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _stage_facts(run_dir: Path, stage: str, run_info: dict, pruned: dict) -> dict[str, Any]:
    """Params, MACs and validation metrics of a stage's PyTorch model: its metrics.json when that covers
    the validation split (else computed as fine-tuning evaluates), MACs from ``pruned`` (pruned/metrics.json,
    empty when absent) or counted."""
    from edge_tl.data import run_crop
    from edge_tl.finetune import predict_logits, run_records
    from edge_tl.metrics import classification_metrics
    from edge_tl.prune_stage import PRUNED_DIR, load_stage_model

    prefix = "" if stage == "pruned" else "parent_"
    params, macs = pruned.get(f"{prefix}params"), pruned.get(f"{prefix}macs")
    metrics_path = (run_dir if stage == "float" else run_dir / PRUNED_DIR) / "metrics.json"
    metrics = pruned if stage == "pruned" else _optional_json(metrics_path)
    source, model = str(metrics_path.relative_to(run_dir)), None
    if metrics.get("num_samples") != len(run_info["split"]["val_files"]) or "balanced_accuracy" not in metrics:
        model, records = load_stage_model(run_dir, stage)[0], run_records(run_info, "val")
        logits = predict_logits(model, records, run_info["img_size"], run_info["mean"], run_info["std"],
                                crop=run_crop(run_info))
        metrics = classification_metrics([r.label for r in records], logits.argmax(1), run_info["classes"],
                                         run_info.get("ok_class"))
        source = "computed on the validation split"
    if params is None or macs is None:
        from edge_tl.model_cost import count_macs, count_params

        model = model if model is not None else load_stage_model(run_dir, stage)[0]
        params, macs = count_params(model), count_macs(model, run_info["img_size"])
    return {"params": int(params), "macs": int(macs), "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"], "escape_rate": metrics.get("escape_rate"),
            "accuracy_source": source}


def _verdict(run_dir: Path, artifact: Path) -> dict | None:
    """RUN_DIR/verify/<artifact>.json when it was made from this very file."""
    from edge_tl.verify import verify_path

    path = verify_path(run_dir, artifact)
    if not path.is_file():
        return None
    result = read_json(path)
    if result.get("artifact_sha256") != sha256_file(artifact):
        logger.warning("%s is about another version of %s; ignoring it (rerun `edge-tl verify`)", path, artifact.name)
        return None
    return result


def _artifact_facts(run_dir: Path, artifact: Path, verdict: dict | None, stage_facts: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """The artifact's row facts: params and MACs of its stage, accuracy from ``verdict`` when that covers the
    validation split, else computed with verify's own loading, preprocessing and batching."""
    from edge_tl.verify import artifact_predictions

    metrics, source = verdict or {}, f"verify/{artifact.name}.json"
    if verdict is None or verdict.get("data") != "validation split":
        try:
            metrics, source = artifact_predictions(run_dir, artifact).metrics(), "computed on the validation split"
        except DatasetError as err:  # a run copied to a device without its images: time it anyway
            logger.warning("no accuracy for %s: %s", artifact.name, err)
            metrics, source = {}, None
    return {"params": stage_facts.get("params"), "macs": stage_facts.get("macs"), "accuracy": metrics.get("accuracy"),
            "balanced_accuracy": metrics.get("balanced_accuracy"), "escape_rate": metrics.get("escape_rate"),
            "accuracy_source": source}


def _run_targets(run_dir: Path, run_info: dict, cfg: BenchConfig, backends: list[str], skipped: list[dict]
                 ) -> tuple[list[_Target], dict[str, dict], dict[str, dict]]:
    """(targets, verify results by artifact name, facts by stage) for every artifact of a run."""
    from edge_tl.prune_stage import PRUNED_DIR, load_stage_model
    from edge_tl.runners.torch_runner import TorchRunner
    from edge_tl.verify import check_run_pairing

    stages = ["float", *(["pruned"] if (run_dir / PRUNED_DIR).is_dir() else [])]
    pruned = _optional_json(run_dir / PRUNED_DIR / "metrics.json")
    facts = {stage: _stage_facts(run_dir, stage, run_info, pruned) for stage in stages}
    targets, verdicts = [], {}
    for stage in stages if "torch" in backends else []:
        weights = (run_dir if stage == "float" else run_dir / PRUNED_DIR) / "model.safetensors"
        make_runner = lambda stage=stage: TorchRunner(load_stage_model(run_dir, stage)[0], run_info["img_size"])  # noqa: E731
        targets.append(_Target(f"model.{stage} (pytorch)", "torch", make_runner, weights.stat().st_size,
                               run_info["img_size"], "fp32", stage, None, facts[stage]))
    for suffix, backend in SUFFIX_BACKENDS.items():
        for path in sorted(p for p in (run_dir / "export").glob(f"*{suffix}") if not p.name.startswith(".")):
            if backend not in backends:
                if backend in cfg.backends:
                    skipped.append({"artifact": path.name, "backend": backend, "batch_size": None,
                                    "reason": unavailable_reason(backend)})
                continue
            check_run_pairing(path, run_dir)  # an engine or ONNX file of another run is not benched as this one's
            target, verdict = _artifact_target(path, backend, cfg), _verdict(run_dir, path)
            if verdict is not None:
                verdicts[path.name] = verdict
            targets.append(dataclasses.replace(
                target, facts=_artifact_facts(run_dir, path, verdict, facts.get(target.stage, {}))))
    return targets, verdicts, facts


# --- the table and the stage ----------------------------------------------------------------

def bench_table(result: BenchResult) -> Table:
    """The rows by batch size and p50 latency, with the speed ratio to the float FP32 ONNX row."""
    from rich.table import Table

    def number(value, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, spec)

    table = Table(title=f"benchmark on {result.machine.get('cpu')}, {result.machine.get('threads')} thread(s)")
    for column in ("artifact", "backend", "batch", "p50 ms", "p99 ms", "cv", "img/s", "size MB", "bal. acc.",
                   "peak MB", "x fp32 onnx"):
        table.add_column(column, justify="left" if column in ("artifact", "backend") else "right",
                         no_wrap=column == "artifact")
    chosen = (result.recommended or {}).get("artifact")
    for row in sorted(result.rows, key=lambda r: (r.batch_size, r.latency_ms["p50"])):
        table.add_row(row.artifact + (" *" if row.artifact == chosen else ""), row.backend, str(row.batch_size),
                      number(row.latency_ms["p50"], ".3f"), number(row.latency_ms["p99"], ".3f"),
                      number(row.cv, ".3f") + ("" if row.stable else " !"), number(row.throughput_ips, ".1f"),
                      number(row.size_bytes, ".2f", 1e6), number(row.balanced_accuracy, ".4f"),
                      number(row.peak_memory_bytes, ".1f", 1e6), number(row.latency_ratio, ".2f"))
    notes = ["! not settled: cv above target within the time budget"]
    if result.recommended is not None:
        notes.insert(0, f"* recommended: {chosen or 'none'}: {result.recommended['reason']}")
    table.caption = "\n".join(notes)
    return table


def _settings(cfg: BenchConfig) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(cfg).items()}


def benchmark(run_dir: str | Path, cfg: BenchConfig = BenchConfig()) -> BenchResult:
    """Time every artifact of a run on every available backend; write RUN_DIR/bench.json and bench.csv."""
    from edge_tl.run_lock import run_lock

    validate_config(cfg)
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    with run_lock(run_dir):  # it writes bench.json and bench.csv
        return _benchmark_run(run_dir, cfg)


def _benchmark_run(run_dir: Path, cfg: BenchConfig) -> BenchResult:
    run_info, skipped = read_json(run_dir / "run.json"), []
    backends = _available_backends(cfg.backends, skipped)
    targets, verdicts, facts = _run_targets(run_dir, run_info, cfg, backends, skipped)
    rows = _time_targets(targets, cfg, skipped)
    from edge_tl.backbones import get_backbone
    from edge_tl.resolution_cost import resolution_cost  # torch: the training side only

    larger = run_info["img_size"] > get_backbone(run_info["backbone"]).default_img_size
    resolution = resolution_cost(run_dir, run_info, threads=cfg.threads) if larger and "onnxruntime" in backends else None
    result = BenchResult(machine_record(cfg.threads), _settings(cfg), tuple(rows), tuple(skipped),
                         recommend(rows, verdicts, facts["float"]), resolution)
    atomic_write_text(run_dir / BENCH_CSV, bench_csv(rows))
    atomic_write_json(run_dir / BENCH_JSON, result.to_dict())
    return result


def benchmark_artifact(path: str | Path, cfg: BenchConfig = BenchConfig()) -> BenchResult:
    """Time a lone .onnx or .engine file (no run: accuracy, params and MACs are None); writes nothing."""
    validate_config(cfg)
    path = Path(path)
    backend = SUFFIX_BACKENDS.get(path.suffix)
    if backend is None:
        raise ConfigError(f"{path.name} is neither .onnx nor .engine; pass an exported artifact or a run directory")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist; export one with `edge-tl export RUN_DIR`")
    if backend not in cfg.backends:
        raise ConfigError(f"{path.name} runs on {backend}, which --backends {','.join(cfg.backends)} leaves out; "
                          "add it")
    skipped: list[dict] = []
    _available_backends([backend], skipped)
    rows = _time_targets([_artifact_target(path, backend, cfg)], cfg, skipped)
    return BenchResult(machine_record(cfg.threads), _settings(cfg), tuple(rows), tuple(skipped))
