"""The report is a pure consumer of a run directory's records.

The fixture writes a small but complete run directory (run.json, stage metrics, export manifests,
verification records, bench.json) with the project's own metric and comparison functions
(:func:`edge_tl.metrics.classification_metrics`, :func:`edge_tl.verify.compare`) on hand-made
labels and logits, so the numbers in the records are consistent with each other and the report's
tables can be checked cell by cell against them.
"""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.errors import ArtifactError
from edge_tl.metrics import classification_metrics
from edge_tl.plots import pareto_front
from edge_tl.report import latency_speedups, split_class_counts, write_report
from edge_tl.gate import label_free_evidence
from edge_tl.verify import compare

# one class name carries markup characters: it must come out escaped in HTML and Markdown
CLASSES = ["dent", "ok", "scratch<2mm"]
TRAIN = {"dent": 8, "ok": 12, "scratch<2mm": 6}
VAL = {"dent": 3, "ok": 4, "scratch<2mm": 2}
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 2]
FLOAT_PRED = [0, 0, 1, 1, 1, 1, 1, 2, 2]  # one dent passed as ok
PRUNED_PRED = [0, 0, 1, 1, 1, 1, 2, 2, 2]
ARTIFACT_PRED = {  # predictions of each exported artifact; its float reference is the stage's model
    ("float", "fp32"): FLOAT_PRED,
    ("float", "int8"): [0, 1, 1, 1, 1, 1, 1, 2, 1],  # two more escapes: not shown to be within the gate
    ("pruned", "int8"): PRUNED_PRED,  # same predictions as its float model: passes
}
# label-free evidence (3000 images without labels, float calls as reference): the artifacts that agree
# with their float model PASS on it; the float INT8 calls every 20th float-called defect ok (5% new escapes)
UNLABELLED = np.random.default_rng(7).choice(len(CLASSES), size=3000, p=[0.2, 0.6, 0.2])
P50_MS = {("float", "fp32"): 8.0, ("float", "int8"): 3.2, ("pruned", "int8"): 2.0}


def _logits(predictions: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 0.1, size=(len(predictions), len(CLASSES))).astype(np.float32)
    logits[np.arange(len(predictions)), predictions] += 4.0
    return logits


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _bench_row(stage: str, precision: str, batch_size: int, balanced_accuracy: float, stable: bool = True) -> dict:
    p50 = P50_MS[(stage, precision)] * (1 if batch_size == 1 else 0.7 * batch_size)
    return {
        "artifact": f"model.{stage}.{precision}.onnx", "backend": "onnxruntime", "precision": precision,
        "stage": stage, "batch_size": batch_size,
        "latency_ms": {"mean": p50 * 1.02, "p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.25, "min": p50 * 0.97,
                       "max": p50 * 1.4},
        "cv": 0.03 if stable else 0.2, "stable": stable, "throughput_ips": 1000.0 * batch_size / p50,
        "size_bytes": 3_500_000 if precision == "fp32" else 1_000_000, "params": 850_000, "macs": 21_000_000,
        "accuracy": balanced_accuracy, "balanced_accuracy": balanced_accuracy, "peak_memory_bytes": 40_000_000,
        "latency_ratio": P50_MS[("float", "fp32")] / P50_MS[(stage, precision)],
    }


def make_run_dir(run_dir: Path, with_bench: bool = True) -> dict:
    """Write the records of a finished run; returns the verify records keyed by artifact name."""
    train_files = [f"{cls}/{cls}_{i}.png" for cls, n in TRAIN.items() for i in range(n)]
    val_files = [f"{cls}/{cls}_v{i}.png" for cls, n in VAL.items() for i in range(n)]
    _write(run_dir / "run.json", {
        "format": "edge-tl-run", "version": 1, "backbone": "efficientnet_lite0", "img_size": 64, "classes": CLASSES,
        "ok_class": "ok", "mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB", "layout": "NCHW",
        "data_dir": "/data/surface", "class_counts": {cls: TRAIN[cls] + VAL[cls] for cls in CLASSES},
        "split": {"seed": 0, "val_fraction": 0.25, "train_files": train_files, "val_files": val_files},
        "skipped_files": [], "config": {"epochs": 5, "unfreeze": 0},
        "history": [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.6, "val_balanced_accuracy": 0.8}],
    })
    _write(run_dir / "metrics.json", classification_metrics(LABELS, FLOAT_PRED, CLASSES, "ok"))
    pruned = classification_metrics(LABELS, PRUNED_PRED, CLASSES, "ok")
    float_metrics = classification_metrics(LABELS, FLOAT_PRED, CLASSES, "ok")
    pruned.update({"params": 850_000, "parent_params": 1_600_000, "macs": 21_000_000, "parent_macs": 40_000_000,
                   "ort_latency_ms": 2.5, "parent_ort_latency_ms": 8.0,
                   "balanced_accuracy_delta": 100 * (pruned["balanced_accuracy"] - float_metrics["balanced_accuracy"]),
                   "config": {"method": "l1", "sparsity": 0.5}, "recovery": {"best_epoch": 1, "history": [{}, {}]}})
    _write(run_dir / "pruned" / "metrics.json", pruned)
    quantized = classification_metrics(LABELS, ARTIFACT_PRED[("float", "int8")], CLASSES, "ok")
    quantized.update({"stage": "float", "mode": "ptq", "method": "minmax", "calib_images": 16,
                      "balanced_accuracy_delta": 100 * (quantized["balanced_accuracy"]
                                                        - float_metrics["balanced_accuracy"])})
    _write(run_dir / "quantized" / "float" / "metrics.json", quantized)
    records = {}
    for seed, ((stage, precision), predictions) in enumerate(ARTIFACT_PRED.items()):
        name = f"model.{stage}.{precision}.onnx"
        reference = FLOAT_PRED if stage == "float" else PRUNED_PRED
        artifact_calls = UNLABELLED.copy()
        if (stage, precision) == ("float", "int8"):
            artifact_calls[np.flatnonzero(UNLABELLED != CLASSES.index("ok"))[::20]] = CLASSES.index("ok")
        evidence = label_free_evidence(UNLABELLED, artifact_calls, CLASSES, "ok", "train")
        record = {"artifact": name, "backend": "onnxruntime", "stage": stage, "precision": precision,
                  "data": "validation split", "classes": CLASSES,
                  **compare(_logits(reference, seed), _logits(predictions, seed + 10), LABELS, CLASSES, "ok",
                            max_drop=3.0, max_escape_rise=2.0, label_free=evidence)}
        _write(run_dir / "verify" / f"{name}.json", record)
        _write(run_dir / "export" / f"{name}.json", {
            "format": "edge-tl-export", "artifact": name, "stage": stage, "precision": precision, "opset": 17,
            "img_size": 64, "max_abs_diff": 2e-5 if precision == "fp32" else 0.4, "sha256": f"{seed:064x}",
            "size_bytes": 3_500_000 if precision == "fp32" else 1_000_000})
        records[name] = record
    if with_bench:
        rows = [_bench_row(stage, precision, batch, records[f"model.{stage}.{precision}.onnx"]["balanced_accuracy"],
                           stable=(stage, precision) != ("float", "int8"))
                for batch in (1, 8) for stage, precision in ARTIFACT_PRED]
        _write(run_dir / "bench.json", {
            "machine": {"cpu": "Test CPU", "cores": 2, "threads": 1, "onnxruntime_providers": ["CPUExecutionProvider"]},
            "rows": rows,
            "recommended": {"artifact": "model.pruned.int8.onnx", "backend": "onnxruntime",
                            "reason": "fastest artifact that passed verification at batch 1"}})
    (run_dir / "recipe.yaml").write_text("prune:\n  sparsity: 0.5\n", encoding="utf-8")
    return records


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    records = make_run_dir(run_dir)
    result = write_report(run_dir)
    return run_dir, records, result, result.markdown_path.read_text(encoding="utf-8")


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def _table_row(section: str, first_cell: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one row for {first_cell} in:\n{section}"
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def test_dataset_section_has_counts_per_split(reported):
    run_dir, _, _, markdown = reported
    section = _section(markdown, "Dataset")
    assert _table_row(section, "dent") == ["dent", "8", "3", "11"]
    assert _table_row(section, "ok (ok class)") == ["ok (ok class)", "12", "4", "16"]
    assert _table_row(section, r"scratch\<2mm") == [r"scratch\<2mm", "6", "2", "8"]
    assert _table_row(section, "**all**") == ["**all**", "**26**", "**9**", "**35**"]
    counts = split_class_counts(json.loads((run_dir / "run.json").read_text()))
    assert counts == {"train": TRAIN, "val": VAL}


def test_verification_table_matches_records(reported):
    _, records, _, markdown = reported
    section = _section(markdown, "Verification")
    assert "**2 of 3 passed**" in section
    for name, record in records.items():
        cells = _table_row(section, f"`{name}`")
        assert cells[2] == f"{100 * record['top1_agreement']:.2f} %"
        assert cells[5] == f"{100 * record['balanced_accuracy']:.2f} %"
        assert cells[6] == f"{record['balanced_accuracy_delta']:+.2f}"
        assert cells[7] == f"{record['escape_rate_delta']:+.2f}"
        bounds = {item["quantity"]: item["upper_points"] for item in record["statistics"]["intervals"]}
        assert cells[8] == f"{bounds['balanced_accuracy_drop']:.2f}" and cells[9] == f"{bounds['escape_rate_rise']:.2f}"
        assert cells[10] == f"{bounds['label_free_new_escape']:.2f}"
        assert cells[-1] == f"**{record['verdict']}**"
    # the hand-made predictions decide the verdicts: int8 float model lost two defects (and 5% of the
    # unlabelled ones), pruned int8 none
    assert [records[n]["verdict"] for n in records] == ["PASS", "INCONCLUSIVE", "PASS"]
    assert records["model.float.int8.onnx"]["top1_agreement"] == pytest.approx(7 / 9)
    assert _table_row(section, "`model.float.int8.onnx`")[11] == "dent->ok x1, scratch\\<2mm->ok x1"
    assert "What would settle the INCONCLUSIVE ones:" in section and "training split was also fitted" in section


def test_stage_metrics_and_benchmark(reported):
    _, _, _, markdown = reported
    stages = _section(markdown, "Stage metrics")
    tuned = classification_metrics(LABELS, FLOAT_PRED, CLASSES, "ok")
    assert _table_row(stages, "fine-tuned (float)")[2] == f"{100 * tuned['balanced_accuracy']:.2f} %"
    assert _table_row(stages, "pruned")[6:] == ["850.00 k", "21.00 M"]
    bench = _section(markdown, "Benchmark")
    assert "- cpu: Test CPU" in bench
    batch1 = [line for line in bench.splitlines() if line.startswith("| `") and " | 1 | " in line]
    assert [line.split(" | ")[0] for line in batch1] == [  # sorted by latency
        "| `model.pruned.int8.onnx`", "| `model.float.int8.onnx`", "| `model.float.fp32.onnx`"]
    cells = [cell.strip() for cell in batch1[0].strip("|").split(" | ")]
    assert cells[8] == "4.00x"  # 8.0 ms float FP32 ONNX over 2.0 ms
    assert cells[-2:] == ["**PASS**", "Pareto front"]
    # the pruned INT8 model is faster and more accurate than the float INT8 one: only the float FP32 joins it
    assert [cell.strip() for cell in batch1[1].strip("|").split(" | ")][-2:] == ["**INCONCLUSIVE**", "unstable"]
    assert [cell.strip() for cell in batch1[2].strip("|").split(" | ")][-2:] == ["**PASS**", "Pareto front"]
    assert "```yaml\nprune:\n  sparsity: 0.5\n```" in _section(markdown, "Recipe")


def test_recommended_artifact_is_named_with_reason(reported):
    _, records, _, markdown = reported
    section = _section(markdown, "Recommended artifact")
    assert section.startswith("**model.pruned.int8.onnx** on `onnxruntime`. Why: fastest artifact that passed")
    assert "4.00x the speed of the float FP32 ONNX model" in section
    assert f"top-1 agreement {100 * records['model.pruned.int8.onnx']['top1_agreement']:.2f} %" in section


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9), (2.0, 0.7), (5.0, 0.9), (0.5, 0.4), (4.0, 0.8)]
    # (3, .6) loses to (2, .7); (5, .9) and (4, .8) lose to (4, .9); the two (2, .7) tie and both stay
    assert pareto_front(points) == [6, 0, 1, 4, 3]
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([]) == []


def test_latency_speedups_use_bench_ratios_or_the_float_fp32_onnx_row():
    rows = [_bench_row("float", "int8", 1, 0.8), _bench_row("float", "fp32", 1, 0.9),
            _bench_row("pruned", "int8", 8, 0.8)]
    for row in rows:
        del row["latency_ratio"]
    # batch 1: 8.0 ms reference over 3.2 ms and itself; batch 8 has no float FP32 ONNX row to compare with
    assert latency_speedups(rows) == [pytest.approx(2.5), pytest.approx(1.0), None]
    rows[0]["latency_ratio"] = 2.4  # what bench.json says wins over a recomputation
    assert latency_speedups(rows)[0] == 2.4


def test_no_recommendation_lists_the_rejected(tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir)
    bench = json.loads((run_dir / "bench.json").read_text())
    rejected = {"model.float.int8.onnx": "failed verification",
                "model.pruned.int8.onnx": "balanced accuracy 8.33 points below the float model"}
    bench["recommended"] = {"artifact": None, "batch_size": 1, "reason": "no artifact passed verification",
                            "rejected": rejected}
    _write(run_dir / "bench.json", bench)
    section = _section(write_report(run_dir).markdown_path.read_text(encoding="utf-8"), "Recommended artifact")
    assert section.splitlines()[0] == "No artifact recommended: no artifact passed verification."
    assert "- `model.pruned.int8.onnx`: balanced accuracy 8.33 points below the float model" in section


def test_plots_are_real_pngs(reported):
    run_dir, _, result, markdown = reported
    names = sorted(path.name for path in result.plot_paths)
    assert names == ["accuracy_vs_latency.png", "confusion_float_int8.png", "confusion_pruned_int8.png",
                     "per_class_recall.png"]
    for path in result.plot_paths:
        assert path.parent == run_dir / "plots" and path.stat().st_size > 15_000
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
            image.verify()
        assert f"](plots/{path.name})" in markdown
        # the report is written after every figure it shows
        assert path.stat().st_mtime_ns <= result.markdown_path.stat().st_mtime_ns
    assert not list(run_dir.rglob("*.tmp"))


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_escaped_and_self_contained(reported):
    run_dir, _, result, markdown = reported
    page = result.html_path.read_text(encoding="utf-8")
    assert "scratch&lt;2mm" in page and "scratch<2mm" not in page
    parser = _Collector()
    parser.feed(page)
    assert "2mm" not in " ".join(parser.tags)  # the class name never became a tag
    assert "scratch<2mm" in "".join(parser.text)  # but reads correctly once unescaped
    assert sorted(parser.images) == sorted(f"plots/{path.name}" for path in result.plot_paths)
    assert all((run_dir / src).is_file() for src in parser.images)
    # dataset, stages, exports, per-class recall, verification, benchmark: the same tables as the Markdown
    assert parser.tags.count("table") == markdown.count("\n|---") == 6
    # verification row, bench rows at batch 1 and 8
    assert page.count('<strong class="inconclusive">INCONCLUSIVE</strong>') == 1 + 2


def test_rerun_removes_only_its_own_stale_figures(tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir)
    first = write_report(run_dir)
    assert len(first.plot_paths) == 4
    plots_dir = run_dir / "plots"
    # not the report's: another naming scheme, another extension, a folder; a stage an earlier run had is
    (plots_dir / "annotated_defects.png").write_bytes(b"mine")
    (plots_dir / "per_class_recall.png.bak").write_bytes(b"mine")
    (plots_dir / "confusion_old_int8.png" / "nested").mkdir(parents=True)
    (plots_dir / "confusion_qat-v1_int8.png").write_bytes(b"earlier report")
    # the run loses its benchmark and the pruned INT8 verification: two of the four figures are no longer drawn
    (run_dir / "bench.json").unlink()
    (run_dir / "verify" / "model.pruned.int8.onnx.json").unlink()
    second = write_report(run_dir)
    assert sorted(path.name for path in second.plot_paths) == ["confusion_float_int8.png", "per_class_recall.png"]
    assert sorted(path.name for path in plots_dir.iterdir()) == [
        "annotated_defects.png", "confusion_float_int8.png", "confusion_old_int8.png", "per_class_recall.png",
        "per_class_recall.png.bak"]
    assert (plots_dir / "annotated_defects.png").read_bytes() == b"mine"
    assert (plots_dir / "confusion_old_int8.png" / "nested").is_dir()
    markdown = second.markdown_path.read_text(encoding="utf-8")
    assert "accuracy_vs_latency" not in markdown and "confusion_pruned_int8" not in markdown
    parser = _Collector()
    parser.feed(second.html_path.read_text(encoding="utf-8"))
    assert sorted(parser.images) == ["plots/confusion_float_int8.png", "plots/per_class_recall.png"]


def test_missing_bench_says_so(tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, with_bench=False)
    result = write_report(run_dir)
    markdown = result.markdown_path.read_text(encoding="utf-8")
    assert _section(markdown, "Benchmark").strip() == f"Not benchmarked; run `edge-tl bench {run_dir}`."
    assert _section(markdown, "Recommended artifact").startswith("None recommended yet")
    assert sorted(path.name for path in result.plot_paths) == [
        "confusion_float_int8.png", "confusion_pruned_int8.png", "per_class_recall.png"]
    assert "accuracy_vs_latency" not in markdown


def test_run_with_only_finetune_records(tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, with_bench=False)
    for folder in ("pruned", "quantized", "export", "verify"):
        shutil.rmtree(run_dir / folder)
    (run_dir / "recipe.yaml").unlink()
    result = write_report(run_dir)
    markdown = result.markdown_path.read_text(encoding="utf-8")
    assert "No artifact verified yet; run `edge-tl verify" in markdown
    assert "## Recipe" not in markdown
    assert [path.name for path in result.plot_paths] == ["per_class_recall.png"]


def test_missing_run_json_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError) as caught:
        write_report(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "no run.json" in message and "edge-tl finetune" in message
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "plots").exists()


def test_crop_and_escape_budget_are_reported(tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, with_bench=False)
    info = json.loads((run_dir / "run.json").read_text())
    info["crop"] = 0.875
    info["operating_point"] = {"max_escape": 0.02, "ok_logit_shift": 0.7129, "escape_rate": 0.0179,
                               "false_reject_rate": 0.1303, "balanced_accuracy": 0.93, "folds": 5}
    (run_dir / "run.json").write_text(json.dumps(info))
    markdown = write_report(run_dir).markdown_path.read_text(encoding="utf-8")
    assert "the centre 0.875 of each squashed image" in markdown
    assert (f"escape budget 2.0%: the {info['ok_class']} logit is lowered by 0.713 in every artifact" in markdown
            and "escape 1.79%, false reject 13.03%" in markdown)
