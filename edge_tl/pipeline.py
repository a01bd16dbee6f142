"""`edge-tl run`: the whole chain, resumable.

fine-tune -> prune -> quantize (each stage in ``quantize.stages``) -> export ONNX (each precision,
each stage; TensorRT engines where TensorRT and a GPU exist) -> verify every artifact -> bench ->
report.

Every step has a fingerprint: the sha256 of its settings and of the files it reads (the dataset's
bytes, the parent model, the calibration file, the artifact). After a step finishes, its
fingerprint and outputs go into ``RUN_DIR/pipeline.json`` (atomically, after the step's own
outputs, which every stage already writes atomically). Running again skips each step whose
fingerprint is unchanged and whose outputs are all still there, and redoes the rest: a run that
was killed mid-step picks up at that step, and a changed setting redoes just the steps it reaches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edge_tl.artifacts import atomic_write_json, atomic_write_text, read_json, sha256_file, sha256_text
from edge_tl.errors import BackendUnavailableError
from edge_tl.pack_format import stage_model_files
from edge_tl.recipe import Recipe
from edge_tl.run_lock import run_lock

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
RECIPE_FILE = "recipe.yaml"
STATE_VERSION = 1


@dataclass
class StepRecord:
    name: str
    status: str  # "done" (ran now) or "skipped" (unchanged since an earlier run)
    seconds: float
    outputs: list[str]


@dataclass
class PipelineResult:
    run_dir: Path
    steps: list[StepRecord] = field(default_factory=list)
    verification: list[dict] = field(default_factory=list)
    seconds_total: float = 0.0

    def step(self, name: str) -> StepRecord:
        return next(record for record in self.steps if record.name == name)


def dataset_fingerprint(data_dir: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes: the fine-tuning input, exactly."""
    root = Path(data_dir)
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        lines.append(f"{relative.as_posix()} {sha256_file(path)}")
    return sha256_text(lines)


def _settings_hash(*settings: Any) -> str:
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    return sha256_text([json.dumps(plain(value), sort_keys=True, default=str) for value in settings])


class _State:
    """RUN_DIR/pipeline.json: the fingerprint and outputs of every finished step."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_FILE
        state = read_json(self.path) if resume and self.path.is_file() else {}
        self.steps: dict[str, dict] = state.get("steps", {}) if state.get("version") == STATE_VERSION else {}

    def is_current(self, name: str, fingerprint: str) -> bool:
        record = self.steps.get(name)
        return (record is not None and record["fingerprint"] == fingerprint
                and all((self.run_dir / output).exists() for output in record["outputs"]))

    def finish(self, name: str, fingerprint: str, outputs: list[Path], seconds: float) -> None:
        self.steps[name] = {"fingerprint": fingerprint, "seconds": round(seconds, 3),
                            "outputs": [str(Path(p).resolve().relative_to(self.run_dir.resolve())) for p in outputs]}
        atomic_write_json(self.path, {"version": STATE_VERSION, "steps": self.steps})


def _clean_partials(run_dir: Path) -> None:
    """Remove what a killed stage may leave: hidden staging folders (``.*.partial``, the fine-tuning
    one beside the run) and atomic-write temporaries (``.*.tmp``); never a finished output."""
    leftovers = [*run_dir.rglob(".*.partial"), *run_dir.rglob(".*.tmp"),
                 *run_dir.parent.glob(f".{run_dir.name}.*.partial")]
    for partial in leftovers:
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def _engines_available() -> bool:
    from export.tensorrt_compat import check_engine_build_possible

    try:
        check_engine_build_possible()
    except BackendUnavailableError as err:
        logger.info("no TensorRT engines: %s", err)
        return False
    return True


class _Runner:
    """Runs steps in order, skipping the unchanged ones, and collects their records."""

    def __init__(self, result: PipelineResult, state: _State) -> None:
        self.result, self.state = result, state
        self._digests: dict[tuple[Path, int, int], str] = {}

    def files_hash(self, paths: list[Path]) -> str:
        """sha256 over names and contents; each file is read once per run (and again only if its
        size or modification time changed), not once for every step that reads it."""
        lines = []
        for path in paths:
            stat = path.stat()
            key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = sha256_file(path)
            lines.append(f"{path.name} {self._digests[key]}")
        return sha256_text(lines)

    def step(self, name: str, fingerprint: str, work: Callable[[], list[Path]]) -> None:
        started = time.perf_counter()
        if self.state.is_current(name, fingerprint):
            outputs = self.state.steps[name]["outputs"]
            self.result.steps.append(StepRecord(name, "skipped", 0.0, outputs))
            logger.info("%s: unchanged, skipped", name)
            return
        logger.info("%s: running", name)
        outputs = work()
        seconds = time.perf_counter() - started
        self.state.finish(name, fingerprint, outputs, seconds)
        self.result.steps.append(StepRecord(name, "done", seconds, self.state.steps[name]["outputs"]))


def run_pipeline(data_dir: str | os.PathLike, run_dir: str | os.PathLike, recipe: Recipe,
                 force: bool = False) -> PipelineResult:
    """Run (or resume) the chain on DATA_DIR into RUN_DIR with ``recipe``.

    An existing RUN_DIR that ``edge-tl run`` made is resumed; any other non-empty folder needs
    ``force`` (which starts it over). The whole run holds RUN_DIR's lock (:mod:`edge_tl.run_lock`).
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    with run_lock(run_dir):  # every stage below takes it again, nested
        return _run_pipeline(data_dir, run_dir, recipe, force)


def _run_pipeline(data_dir: Path, run_dir: Path, recipe: Recipe, force: bool) -> PipelineResult:
    from edge_tl.finetune import finetune
    from edge_tl.finetune_config import validate_inputs

    started = time.perf_counter()
    resumable = (run_dir / STATE_FILE).is_file() and not force
    finetune_cfg = recipe.config("finetune")
    validate_inputs(data_dir, run_dir, finetune_cfg, force=force or resumable)
    result = PipelineResult(run_dir)
    if resumable:
        _clean_partials(run_dir)
    runner = _Runner(result, _State(run_dir, resume=resumable))

    def do_finetune() -> list[Path]:
        finetune(data_dir, run_dir, finetune_cfg, force=True)  # replaces the run: every later step is redone
        runner.state.steps.clear()
        return [run_dir / "model.safetensors", run_dir / "run.json", run_dir / "metrics.json"]

    runner.step("finetune", _settings_hash(finetune_cfg, dataset_fingerprint(data_dir)), do_finetune)
    recipe_file, recipe_text = run_dir / RECIPE_FILE, recipe.to_yaml()
    if not recipe_file.is_file() or recipe_file.read_text() != recipe_text:
        atomic_write_text(recipe_file, recipe_text)
    _compress(runner, run_dir, recipe)
    artifacts = _export(runner, run_dir, recipe)
    _verify(runner, run_dir, recipe, artifacts)
    _bench_and_report(runner, run_dir, recipe, artifacts)
    result.seconds_total = time.perf_counter() - started
    return result


def _compress(runner: _Runner, run_dir: Path, recipe: Recipe) -> None:
    from edge_tl.prune_stage import prune_run
    from edge_tl.quantize import quantize, quantized_dir

    if recipe.extra("prune", "enabled"):
        prune_cfg = recipe.config("prune")
        runner.step("prune", _settings_hash(prune_cfg, runner.files_hash(stage_model_files(run_dir, "float"))),
                    lambda: [prune_run(run_dir, prune_cfg).pruned_dir])
    for stage in recipe.extra("quantize", "stages"):
        cfg = replace(recipe.config("quantize"), stage=stage)

        def do_quantize(cfg=cfg) -> list[Path]:
            quantize(run_dir, cfg)
            return [quantized_dir(run_dir, cfg.stage)]

        runner.step(f"quantize/{stage}", _settings_hash(cfg, runner.files_hash(stage_model_files(run_dir, stage))),
                    do_quantize)


def _export_plan(run_dir: Path, recipe: Recipe) -> list:
    """Every (config) to export: ONNX per precision and stage; engines where TensorRT is usable."""
    stages = ["float"] + (["pruned"] if recipe.extra("prune", "enabled") else [])
    quantized = set(recipe.extra("quantize", "stages"))
    gate = recipe.config("verify")  # the verification packs carry the run's gate to the device
    template = replace(recipe.config("export"), max_drop=gate.max_drop, max_escape_rise=gate.max_escape_rise,
                       confidence=gate.confidence, unlabelled=gate.unlabelled)
    plan = []
    for stage in stages:
        for precision in recipe.extra("export", "precisions"):
            if precision == "int8" and stage not in quantized:
                logger.info("no INT8 export of the %s stage: it is not in quantize.stages", stage)
                continue
            plan.append(replace(template, format="onnx", precision=precision, stage=stage,
                                dla_core=None, timing_cache=None, max_batch=1))
    engines = recipe.extra("export", "engines")
    if engines == "always" or (engines == "auto" and _engines_available()):
        for stage in stages:
            for precision in recipe.extra("export", "engine_precisions"):
                if precision == "int8" and stage not in quantized:
                    continue
                plan.append(replace(template, format="engine", precision=precision, stage=stage))
    return plan


def _export(runner: _Runner, run_dir: Path, recipe: Recipe) -> list[tuple[Path, str]]:
    """Export every planned artifact; returns (artifact path, stage) pairs."""
    from export.stage import artifact_name, calibration_path, export_artifact, export_dir, onnx_manifest_path
    from export.tensorrt_build import manifest_path as engine_manifest_path

    artifacts = []
    for cfg in _export_plan(run_dir, recipe):
        inputs = stage_model_files(run_dir, cfg.stage)
        if cfg.precision == "int8":
            inputs.append(calibration_path(run_dir, cfg.stage))
            qat_weights = calibration_path(run_dir, cfg.stage).parent / "model.safetensors"
            inputs += [qat_weights] if qat_weights.is_file() else []
        name = artifact_name(cfg.stage, cfg.precision, cfg.format, cfg.target)
        path = export_dir(run_dir) / name

        def do_export(cfg=cfg) -> list[Path]:
            manifest = export_artifact(run_dir, cfg)
            artifact = Path(manifest["path"])
            manifest_file = onnx_manifest_path(artifact) if cfg.format == "onnx" else engine_manifest_path(artifact)
            return [artifact, manifest_file, export_dir(run_dir) / manifest["verification_pack"]["file"]]

        runner.step(f"export/{name}", _settings_hash(cfg, runner.files_hash(inputs)), do_export)
        artifacts.append((path, cfg.stage))
    return artifacts


def _verify(runner: _Runner, run_dir: Path, recipe: Recipe, artifacts: list[tuple[Path, str]]) -> None:
    from edge_tl.verify import verify, verify_path

    cfg = recipe.config("verify")
    for artifact, stage in artifacts:
        def do_verify(artifact=artifact) -> list[Path]:
            verify(run_dir, artifact, max_drop=cfg.max_drop, max_escape_rise=cfg.max_escape_rise,
                   confidence=cfg.confidence, unlabelled=cfg.unlabelled,
                   batch_size=cfg.batch_size)
            return [verify_path(run_dir, artifact)]

        runner.step(f"verify/{artifact.name}",
                    _settings_hash(cfg, runner.files_hash([artifact] + stage_model_files(run_dir, stage))), do_verify)
        runner.result.verification.append(read_json(verify_path(run_dir, artifact)))


def _bench_and_report(runner: _Runner, run_dir: Path, recipe: Recipe, artifacts: list[tuple[Path, str]]) -> None:
    from edge_tl.bench import benchmark
    from edge_tl.report import write_report
    from edge_tl.verify import verify_path

    bench_cfg = recipe.config("bench")
    paths = [artifact for artifact, _ in artifacts]
    inputs = runner.files_hash(paths + [verify_path(run_dir, a) for a in paths] + stage_model_files(run_dir, "float"))

    def do_bench() -> list[Path]:
        benchmark(run_dir, bench_cfg)
        return [run_dir / "bench.json", run_dir / "bench.csv"]

    runner.step("bench", _settings_hash(bench_cfg, inputs), do_bench)
    report_inputs = sorted(p for pattern in ("*.json", "*/*.json", "quantized/*/metrics.json", RECIPE_FILE)
                           for p in run_dir.glob(pattern) if p.name != STATE_FILE)

    def do_report() -> list[Path]:
        write_report(run_dir)
        return [run_dir / "report.md", run_dir / "report.html"]

    runner.step("report", runner.files_hash(report_inputs), do_report)
