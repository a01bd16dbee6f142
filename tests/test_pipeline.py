"""`edge-tl run`: the whole chain on generated data, then resumed, changed, interrupted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edge_tl.cli import main
from edge_tl.pipeline import STATE_FILE, dataset_fingerprint, run_pipeline
from edge_tl.recipe import recipe_from_dict
from edge_tl.verify_pack import read_pack

PX = 64
RAW_RECIPE = {
    "finetune": {"img_size": PX, "epochs": 2, "augmented_views": 1, "ok_class": "ok"},
    "prune": {"sparsity": 0.25, "recover_epochs": 1, "latency_runs": 5},
    "quantize": {"calib_images": 16, "reconstruct": False},  # reconstruction: tests/test_quantize.py
    "export": {"precisions": ["fp32", "int8"]},
    "verify": {"max_drop": 100.0, "max_escape_rise": 100.0},
    "bench": {"backends": ["onnxruntime"], "batch_sizes": [1], "warmup": 1, "min_time_s": 0.05, "min_runs": 3},
}
EXPECTED_STEPS = ["finetune", "prune", "quantize/float", "quantize/pruned",
                  "export/model.float.fp32.onnx", "export/model.float.int8.onnx",
                  "export/model.pruned.fp32.onnx", "export/model.pruned.int8.onnx",
                  "verify/model.float.fp32.onnx", "verify/model.float.int8.onnx",
                  "verify/model.pruned.fp32.onnx", "verify/model.pruned.int8.onnx", "bench", "report"]


@pytest.fixture(scope="module")
def finished_run(surface_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_pipeline(surface_dataset, run_dir, recipe_from_dict(RAW_RECIPE))
    return run_dir, result


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name != STATE_FILE}


def test_first_run_makes_every_artifact_and_records_it(finished_run):
    run_dir, result = finished_run
    assert [step.name for step in result.steps] == EXPECTED_STEPS
    assert all(step.status == "done" for step in result.steps)
    for name in ("model.safetensors", "pruned/shape.json", "quantized/float/calibration.json",
                 "export/model.pruned.int8.onnx", "verify/model.pruned.int8.onnx.json", "bench.json", "bench.csv",
                 "report.md", "report.html", "recipe.yaml"):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["finetune"]["img_size"] == PX and saved["prune"]["sparsity"] == 0.25
    assert recipe_from_dict(saved).to_dict() == recipe_from_dict(RAW_RECIPE).to_dict()
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert sorted(state["steps"]) == sorted(EXPECTED_STEPS)
    assert len(result.verification) == 4
    assert {Path(v["artifact"]).name for v in result.verification} == {
        "model.float.fp32.onnx", "model.float.int8.onnx", "model.pruned.fp32.onnx", "model.pruned.int8.onnx"}
    assert all(v["top1_agreement"] > 0.5 for v in result.verification)
    bench = json.loads((run_dir / "bench.json").read_text())
    assert {row["artifact"] for row in bench["rows"] if row["backend"] == "onnxruntime"} >= {
        "model.float.fp32.onnx", "model.pruned.int8.onnx"}


def test_second_run_skips_everything_and_touches_nothing(finished_run, surface_dataset):
    run_dir, _ = finished_run
    before = _mtimes(run_dir)
    result = run_pipeline(surface_dataset, run_dir, recipe_from_dict(RAW_RECIPE))
    assert [step.status for step in result.steps] == ["skipped"] * len(EXPECTED_STEPS)
    assert _mtimes(run_dir) == before
    assert len(result.verification) == 4


def test_changed_setting_redoes_only_what_it_reaches(finished_run, surface_dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    raw = {**RAW_RECIPE, "verify": {"max_drop": 50.0, "max_escape_rise": 100.0}}
    result = run_pipeline(surface_dataset, run_dir, recipe_from_dict(raw))
    done = [step.name for step in result.steps if step.status == "done"]
    # the gate reaches the exports too: each stage's verification pack carries it to the device
    assert done == [name for name in EXPECTED_STEPS if name.startswith(("export/", "verify/"))] + ["bench", "report"]
    assert read_pack(run_dir / "export" / "verify-pack.float.json").max_drop == 50.0
    assert all(v["max_drop"] == 50.0 for v in result.verification)


def test_interrupted_run_resumes_at_the_step_that_was_cut(finished_run, surface_dataset, tmp_path, monkeypatch):
    import export.stage

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    for name in ("export", "verify", "bench.json", "bench.csv", "report.md", "report.html"):
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    real_export = export.stage.export_artifact
    calls = []

    def export_then_die(run, cfg):
        calls.append(cfg)
        if len(calls) == 2:  # the second export is cut short, as by a kill
            raise KeyboardInterrupt
        return real_export(run, cfg)

    monkeypatch.setattr(export.stage, "export_artifact", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(surface_dataset, run_dir, recipe_from_dict(RAW_RECIPE))
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["model.float.fp32.onnx",
                                                                     "model.float.fp32.onnx.json",
                                                                     "verify-pack.float.json"]
    monkeypatch.setattr(export.stage, "export_artifact", real_export)
    result = run_pipeline(surface_dataset, run_dir, recipe_from_dict(RAW_RECIPE))
    status = {step.name: step.status for step in result.steps}
    assert [name for name, s in status.items() if s == "skipped"] == EXPECTED_STEPS[:5]
    assert (run_dir / "export/model.pruned.int8.onnx").is_file() and (run_dir / "report.md").is_file()


def test_changed_dataset_changes_the_fingerprint(surface_dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(surface_dataset, copy)
    assert dataset_fingerprint(copy) == dataset_fingerprint(surface_dataset)
    victim = next((copy / "spot").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert dataset_fingerprint(copy) != dataset_fingerprint(surface_dataset)


def test_cli_refuses_a_foreign_directory_and_a_bad_recipe(surface_dataset, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["run", str(surface_dataset), "--out", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune: {sparsity: 2}\n")
    assert main(["run", str(surface_dataset), "--out", str(tmp_path / "new"), "--recipe", str(recipe)]) == 2
    assert "--sparsity 2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_bench_and_report_verbs(finished_run, capsys):
    run_dir, _ = finished_run
    onnx = run_dir / "export" / "model.float.int8.onnx"
    code = main(["bench", str(onnx), "--backends", "onnxruntime", "--batch", "1,2", "--warmup", "1",
                 "--min-time", "0.05"])
    out = capsys.readouterr().out
    assert code == 0 and "model.float.int8.onnx" in out
    assert main(["bench", str(onnx), "--batch", "one"]) == 2
    assert "--batch 'one'" in capsys.readouterr().err
    assert main(["bench", str(run_dir / "export" / "absent.onnx"), "--backends", "onnxruntime"]) == 2
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (run_dir / "report.md").read_text()
    assert "model.pruned.int8.onnx" in text and "recommended" in text.lower()


def test_a_run_for_a_jetson_exports_the_tensorrt_int8_flavour_with_the_gate():
    from edge_tl.pipeline import _export_plan
    from export.stage import artifact_name

    recipe = recipe_from_dict({"export": {"target": "tensorrt", "engines": "never"},
                               "verify": {"max_drop": 2.5, "max_escape_rise": 1.0}})
    plan = _export_plan(Path("unused"), recipe)
    names = [artifact_name(cfg.stage, cfg.precision, cfg.format, cfg.target) for cfg in plan]
    assert names == [f"model.{stage}.{tag}.onnx" for stage in ("float", "pruned") for tag in ("fp32", "fp16", "int8-trt")]
    assert {(cfg.max_drop, cfg.max_escape_rise) for cfg in plan} == {(2.5, 1.0)}
