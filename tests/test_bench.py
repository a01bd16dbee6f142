"""edge_tl/bench.py and edge_tl/machine.py: timed rows for every artifact of a run, and what they say."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from rich.console import Console

from edge_tl.artifacts import atomic_write_json, read_json
from edge_tl.bench import (LATENCY_KEYS, BenchConfig, BenchResult, BenchRow, bench_table, benchmark,
                           benchmark_artifact, csv_columns, load_bench, recommend, with_ratios)
from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_tl.finetune import FinetuneConfig, finetune, load_checkpoint
from edge_tl.machine import machine_record, peak_rss_growth, time_inference
from edge_tl.model_cost import count_macs, count_params
from edge_tl.runners.base import Runner, TensorSpec
from edge_tl.verify import verify
from export.stage import ExportConfig, export_artifact
from helpers import write_ptq_calibration, write_slim_pruned

PX = 64
FAST = BenchConfig(batch_sizes=(1, 3), warmup=1, min_time_s=0.05, min_runs=3)
TRT_MISSING = importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None
LINUX_PEAK_RSS = Path("/proc/self/clear_refs").exists()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(surface_dataset, tmp_path_factory):
    """A 64 px run: float FP32 and INT8 exports, both verified (INT8 with a wide gate, so that both pass),
    a pruned model (no metrics.json) and its FP32 export (not verified)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "run"
    finetune(surface_dataset, out, FinetuneConfig(img_size=PX, epochs=1, ok_class="ok"))
    write_ptq_calibration(out)
    # a few validation images: the default margins give INCONCLUSIVE; wide ones let both pass
    verify(out, export_artifact(out, ExportConfig(precision="fp32"))["path"], max_drop=100.0, max_escape_rise=100.0)
    verify(out, export_artifact(out, ExportConfig(precision="int8"))["path"], max_drop=100.0, max_escape_rise=100.0)
    write_slim_pruned(out)
    export_artifact(out, ExportConfig(stage="pruned"))
    return out


@pytest.fixture(scope="module")
def result(run_dir):
    torch.set_num_threads(1)
    return benchmark(run_dir, FAST)


def _row(result, artifact, batch_size):
    return next(row for row in result.rows if row.artifact == artifact and row.batch_size == batch_size)


def test_a_row_per_artifact_and_batch_with_ordered_statistics(run_dir, result):
    artifacts = ["model.float (pytorch)", "model.pruned (pytorch)", "model.float.fp32.onnx", "model.float.int8.onnx",
                 "model.pruned.fp32.onnx"]
    assert sorted((r.artifact, r.batch_size) for r in result.rows) == sorted((a, b) for a in artifacts for b in (1, 3))
    for row in result.rows:
        stats = row.latency_ms
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        assert stats["min"] <= stats["mean"] <= stats["max"]
        assert row.throughput_ips == pytest.approx(row.batch_size * 1000.0 / stats["mean"], rel=1e-12)
        assert row.runs >= 2 and row.stable == (row.runs >= FAST.min_runs and row.cv <= FAST.target_cv)
        assert row.backend == ("torch" if row.artifact.endswith("(pytorch)") else "onnxruntime")
        if LINUX_PEAK_RSS:
            assert row.peak_memory_bytes > 0  # at least the session or the model's weights
    assert result.settings["batch_sizes"] == [1, 3] and result.machine["threads"] == 1
    assert _row(result, "model.float.int8.onnx", 1).precision == "int8"
    assert _row(result, "model.pruned.fp32.onnx", 1).stage == "pruned"
    for name in ("model.float.fp32.onnx", "model.float.int8.onnx", "model.pruned.fp32.onnx"):
        assert _row(result, name, 1).size_bytes == (run_dir / "export" / name).stat().st_size
    assert _row(result, "model.float (pytorch)", 1).size_bytes == (run_dir / "model.safetensors").stat().st_size
    if TRT_MISSING:
        assert {"artifact": None, "backend": "tensorrt", "batch_size": None}.items() <= result.skipped[0].items()
        assert "pip install 'edge-tl[tensorrt]'" in result.skipped[0]["reason"]


def test_accuracy_params_and_macs_come_from_the_stages(run_dir, result):
    metrics = read_json(run_dir / "metrics.json")
    float_torch = _row(result, "model.float (pytorch)", 1)
    assert float_torch.balanced_accuracy == metrics["balanced_accuracy"] and float_torch.accuracy == metrics["accuracy"]
    assert float_torch.accuracy_source == "metrics.json"
    model, _ = load_checkpoint(run_dir)
    assert float_torch.params == count_params(model) and float_torch.macs == count_macs(model, PX)
    for name in ("model.float.fp32.onnx", "model.float.int8.onnx"):
        verdict = read_json(run_dir / "verify" / f"{name}.json")
        row = _row(result, name, 3)
        assert (row.accuracy, row.balanced_accuracy, row.escape_rate) == (
            verdict["accuracy"], verdict["balanced_accuracy"], verdict["escape_rate"])
        assert row.accuracy_source == f"verify/{name}.json"
        assert (row.params, row.macs) == (float_torch.params, float_torch.macs)
    # the pruned stage has no metrics.json and its export no verify record: both are computed on the
    # validation split, and an FP32 export agrees with its PyTorch model image for image
    pruned_torch, pruned_onnx = _row(result, "model.pruned (pytorch)", 1), _row(result, "model.pruned.fp32.onnx", 1)
    assert pruned_torch.accuracy_source == pruned_onnx.accuracy_source == "computed on the validation split"
    assert pruned_onnx.balanced_accuracy == pytest.approx(pruned_torch.balanced_accuracy, abs=1e-12)
    assert pruned_onnx.params == pruned_torch.params < float_torch.params
    assert pruned_onnx.macs == pruned_torch.macs < float_torch.macs


def test_ratios_and_recommendation(run_dir, result):
    for batch_size in (1, 3):
        reference = _row(result, "model.float.fp32.onnx", batch_size).latency_ms["p50"]
        for row in (r for r in result.rows if r.batch_size == batch_size):
            assert row.latency_ratio == pytest.approx(reference / row.latency_ms["p50"], rel=1e-12)
    assert _row(result, "model.float.fp32.onnx", 1).latency_ratio == 1.0

    float_metrics = read_json(run_dir / "metrics.json")
    passed = []
    for name in ("model.float.fp32.onnx", "model.float.int8.onnx"):
        verdict = read_json(run_dir / "verify" / f"{name}.json")
        drop = 100 * (float_metrics["balanced_accuracy"] - verdict["balanced_accuracy"])
        if verdict["passed"] and drop <= verdict["max_drop"] + 1e-9:
            passed.append(_row(result, name, 1))
    assert [row.artifact for row in passed] == ["model.float.fp32.onnx", "model.float.int8.onnx"]
    fastest = min(passed, key=lambda row: row.latency_ms["p50"])
    recommended = result.recommended
    assert recommended["artifact"] == fastest.artifact and recommended["batch_size"] == 1
    assert recommended["latency_ms_p50"] == fastest.latency_ms["p50"] and "fastest at batch 1" in recommended["reason"]
    assert recommended["rejected"]["model.pruned.fp32.onnx"].startswith("not verified")
    assert not any(name.endswith("(pytorch)") for name in [recommended["artifact"], *recommended["rejected"]])
    assert list(recommended["rejected"]) == ["model.pruned.fp32.onnx"]


def test_bench_json_and_csv_round_trip(run_dir, result):
    on_disk = read_json(run_dir / "bench.json")
    assert list(on_disk)[:3] == ["machine", "settings", "rows"] and on_disk["recommended"] == result.recommended
    assert on_disk == json.loads(json.dumps(result.to_dict()))
    assert load_bench(run_dir) == BenchResult.from_dict(on_disk) == result
    for row in result.rows:
        assert BenchRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    lines = list(csv.DictReader(io.StringIO((run_dir / "bench.csv").read_text())))
    assert list(lines[0]) == csv_columns() and len(lines) == len(result.rows)
    assert {"latency_ms_p50", "latency_ms_p99", "throughput_ips", "peak_memory_bytes"} <= set(csv_columns())
    assert "latency_ms" not in csv_columns()
    for line, row in zip(lines, result.rows):
        assert (line["artifact"], int(line["batch_size"])) == (row.artifact, row.batch_size)
        assert float(line["latency_ms_p50"]) == row.latency_ms["p50"] and float(line["cv"]) == row.cv
    with pytest.raises(ArtifactError, match="bench row 'x' is malformed"):
        BenchRow.from_dict({"artifact": "x"})


def _render(table) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_table_sorted_by_batch_then_latency(result):
    text = _render(bench_table(result))
    lines = [line for line in text.splitlines() if line.startswith("│")]
    shown = [(r.artifact, r.batch_size) for r in sorted(result.rows, key=lambda r: (r.batch_size, r.latency_ms["p50"]))]
    assert [line.split("│")[1].strip().removesuffix(" *") for line in lines] == [a for a, _ in shown]
    assert [int(line.split("│")[3]) for line in lines] == [b for _, b in shown]
    assert f"{result.recommended['artifact']} *" in text and "x fp32 onnx" in text


def test_stale_or_failed_verification_is_no_candidate(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    fp32_record = read_json(run / "verify" / "model.float.fp32.onnx.json")
    atomic_write_json(run / "verify" / "model.float.fp32.onnx.json", {**fp32_record, "artifact_sha256": "0" * 64})
    int8_record = read_json(run / "verify" / "model.float.int8.onnx.json")
    atomic_write_json(run / "verify" / "model.float.int8.onnx.json", {**int8_record, "passed": False, "verdict": "FAIL"})
    result = benchmark(run, BenchConfig(backends=("onnxruntime",), batch_sizes=(1,), warmup=0, min_time_s=0.01,
                                        min_runs=2))
    row = _row(result, "model.float.fp32.onnx", 1)
    assert row.accuracy_source == "computed on the validation split"
    assert row.balanced_accuracy == pytest.approx(fp32_record["balanced_accuracy"], abs=1e-12)
    assert {r.backend for r in result.rows} == {"onnxruntime"}
    assert result.recommended["artifact"] is None and result.recommended["reason"].startswith("no artifact passed")
    assert result.recommended["rejected"] == {"model.float.fp32.onnx": "not verified; run `edge-tl verify` on it",
                                              "model.float.int8.onnx": "failed verification (FAIL)",
                                              "model.pruned.fp32.onnx": "not verified; run `edge-tl verify` on it"}
    assert "* recommended: none: no artifact passed" in _render(bench_table(result))


def _bench_row(artifact, p50, balanced_accuracy, escape_rate, backend="onnxruntime", batch_size=1):
    latency = dict.fromkeys(LATENCY_KEYS, p50)
    return BenchRow(artifact, backend, "int8", "float", batch_size, latency, 0.0, True, 10, 1000.0 / p50, 1,
                    balanced_accuracy=balanced_accuracy, escape_rate=escape_rate)


def test_recommend_hand_computed():
    float_facts = {"balanced_accuracy": 0.90, "escape_rate": 0.10}
    gate = {"passed": True, "max_drop": 1.0, "max_escape_rise": 0.0}
    rows = [
        _bench_row("model.float (pytorch)", 0.1, 0.90, 0.10, backend="torch"),  # reference, never a candidate
        _bench_row("model.float.fp32.onnx", 4.0, 0.90, 0.10),
        _bench_row("model.float.int8.onnx", 2.0, 0.895, 0.10),                  # 0.5 points down: within the gate
        _bench_row("model.pruned.fp32.onnx", 1.5, 0.85, 0.10),                  # passed vs pruned, 5 points vs float
        _bench_row("model.pruned.int8.onnx", 1.0, 0.90, 0.12),                  # escape rate 2 points up
        _bench_row("model.float.fp16.onnx", 0.5, 0.90, 0.10),                   # never verified
        _bench_row("model.float.int8.onnx", 0.2, 0.895, 0.10, batch_size=8),    # batch 8 does not count
    ]
    verdicts = {name: gate for name in ("model.float.fp32.onnx", "model.float.int8.onnx", "model.pruned.fp32.onnx",
                                        "model.pruned.int8.onnx")}
    chosen = recommend(with_ratios(rows), verdicts, float_facts)
    assert chosen["artifact"] == "model.float.int8.onnx" and chosen["latency_ms_p50"] == 2.0
    assert chosen["latency_ratio"] == 2.0 and "2.00x as fast as model.float.fp32.onnx" in chosen["reason"]
    assert chosen["rejected"] == {
        "model.pruned.fp32.onnx": "balanced accuracy 5.00 points below the fine-tuned float model (gate 1.0)",
        "model.pruned.int8.onnx": "escape rate +2.00 points above the fine-tuned float model",
        "model.float.fp16.onnx": "not verified; run `edge-tl verify` on it"}
    at_the_limit = recommend(rows, {**verdicts, "model.pruned.fp32.onnx": {**gate, "max_drop": 5.0}}, float_facts)
    assert at_the_limit["artifact"] == "model.pruned.fp32.onnx"


def _static_onnx(path: Path, batch: int = 1) -> Path:
    """A plain ONNX file without edge-tl metadata: (batch, 3, 8, 8) -> Relu -> global average pool."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_lone_artifact_has_no_accuracy_and_skips_batches_it_cannot_take(run_dir, tmp_path):
    lone = benchmark_artifact(run_dir / "export" / "model.float.int8.onnx", BenchConfig(batch_sizes=(2,), warmup=0,
                                                                                        min_time_s=0.01, min_runs=2))
    (row,) = lone.rows
    assert (row.artifact, row.backend, row.precision, row.stage, row.batch_size) == (
        "model.float.int8.onnx", "onnxruntime", "int8", "float", 2)
    assert row.accuracy is row.balanced_accuracy is row.params is row.macs is row.latency_ratio is None
    assert lone.recommended is None and not (run_dir / "export" / "bench.json").exists()

    static = benchmark_artifact(_static_onnx(tmp_path / "tiny.onnx"), FAST)
    assert [(r.batch_size, r.precision) for r in static.rows] == [(1, None)]
    assert [(s["artifact"], s["batch_size"]) for s in static.skipped if s["artifact"]] == [("tiny.onnx", 3)]
    assert "static batch 1" in static.skipped[-1]["reason"]
    with pytest.raises(ConfigError, match="nothing could be timed .*tiny.onnx at batch 3: static batch 1"):
        benchmark_artifact(tmp_path / "tiny.onnx", BenchConfig(batch_sizes=(3,)))


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path):
    onnx_path = run_dir / "export" / "model.float.fp32.onnx"
    cases = [
        (lambda: benchmark(tmp_path), ArtifactError, "is not a run directory \\(no run.json\\)"),
        (lambda: benchmark(onnx_path), ArtifactError, "is a file, not a run directory"),
        (lambda: benchmark_artifact(tmp_path / "missing.onnx"), ArtifactError, "missing.onnx does not exist"),
        (lambda: benchmark_artifact(run_dir / "run.json"), ConfigError, "run.json is neither .onnx nor .engine"),
        (lambda: benchmark(run_dir, BenchConfig(backends=("tflite",))), ConfigError, "unknown \\['tflite'\\]"),
        (lambda: benchmark(run_dir, BenchConfig(batch_sizes=(1, 0))), ConfigError,
         "--batch 1,0 must list integers >= 1"),
        (lambda: benchmark(run_dir, BenchConfig(min_time_s=0)), ConfigError, "--min-time 0 must be a number > 0"),
        (lambda: benchmark(run_dir, BenchConfig(threads=0)), ConfigError, "--threads 0 must be an integer >= 1"),
        (lambda: benchmark_artifact(onnx_path, BenchConfig(backends=("torch",))), ConfigError,
         "runs on onnxruntime, which --backends torch leaves out"),
    ]
    if TRT_MISSING:
        cases.append((lambda: benchmark(run_dir, BenchConfig(backends=("tensorrt",))), BackendUnavailableError,
                      "tensorrt needs tensorrt"))
    for call, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            call()
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert not (tmp_path / "bench.json").exists()


class _CopyRunner(Runner):
    """A real, backend-free runner (returns its input), to test the timing loop on its own."""

    def __init__(self) -> None:
        super().__init__("copy")

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _input_specs(self) -> dict[str, TensorSpec]:
        return {"x": TensorSpec("x", (None, 4), np.dtype(np.float32))}

    def _infer(self, feed):
        return {"y": feed["x"].copy()}


def test_timing_loop_stops_when_settled_over_budget_or_at_max_runs():
    feed = {"x": np.zeros((2, 4), np.float32)}
    with _CopyRunner() as runner:
        settled = time_inference(runner, feed, warmup=2, min_runs=5, max_runs=100, min_time_s=60.0, target_cv=1e9)
        capped = time_inference(runner, feed, warmup=0, min_runs=5, max_runs=7, min_time_s=60.0, target_cv=1e-12)
        started = time.perf_counter()
        budget = time_inference(runner, feed, warmup=0, min_runs=10**9, max_runs=10**9, min_time_s=0.05,
                                target_cv=1e-12)
        elapsed_s = time.perf_counter() - started
    assert len(settled) == 5 and len(capped) == 7 and all(sample > 0 for sample in settled + capped)
    assert len(budget) > 2 and 0.05 <= elapsed_s < 5.0  # stopped by the 50 ms budget, not by a count


@pytest.mark.skipif(not LINUX_PEAK_RSS, reason="peak resident memory needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_64_mb_allocation():
    with peak_rss_growth() as measured:
        block = np.ones(8 * 2**20)  # 64 MiB of float64, touched
    assert block.sum() == 8 * 2**20 and 60 * 2**20 <= measured["bytes"] <= 200 * 2**20
    with peak_rss_growth() as idle:
        pass
    assert idle["bytes"] < 8 * 2**20


def test_machine_record():
    record = machine_record(threads=3)
    assert record["threads"] == 3 and record["cpu"] and record["logical_cores"] >= record["usable_cores"] >= 1
    assert record["torch"] == torch.__version__ and "CPUExecutionProvider" in record["onnxruntime_providers"]
    assert {"os", "python", "gpu", "tensorrt", "load_average_1min"} <= set(record)
    assert (record["tensorrt"] is None) == (importlib.util.find_spec("tensorrt") is None)


def test_resolution_cost_times_the_same_weights_at_the_default_size(run_dir, result):
    """The 64 px run against its weights at lite0's default 224 px: real sessions, 12x fewer MACs, faster."""
    from edge_tl.checkpoint import load_checkpoint
    from edge_tl.model_cost import count_macs
    from edge_tl.report import resolution_line
    from edge_tl.resolution_cost import resolution_cost

    assert result.resolution is None  # bench states it for runs larger than the default only
    run_info = read_json(run_dir / "run.json")
    cost = resolution_cost(run_dir, run_info, runs=5, warmup=1)
    assert (cost["img_size"], cost["default_img_size"]) == (PX, 224)
    assert cost["macs"] == count_macs(load_checkpoint(run_dir)[0], PX)
    assert 0.05 < cost["macs_ratio"] < 0.15  # about (64 / 224)^2 = 0.08, the head's MACs aside
    assert 0 < cost["latency_ms_p50"] < cost["default_latency_ms_p50"]
    assert cost["latency_ratio"] == pytest.approx(cost["latency_ms_p50"] / cost["default_latency_ms_p50"])
    assert resolution_line(cost).startswith(f"input size: {PX} px costs {cost['latency_ratio']:.2f}x the latency")
    assert resolution_cost(run_dir, {**run_info, "img_size": 224}) is None
