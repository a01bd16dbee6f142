"""`edge-tl sweep`: grid points as `edge-tl run` trials (Ray Tune with two local workers), reuse, failures, the table."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from edge_tl.cli import main
from edge_tl.errors import ConfigError
from edge_tl.install_profile import importable
from edge_tl.sweep import grid_points
from edge_tl.sweep_report import best_trial

TINY = {  # one float FP32 export per trial: the cheapest whole `edge-tl run`
    "finetune": {"img_size": 64, "epochs": 1, "augmented_views": 0, "ok_class": "ok"},
    "prune": {"enabled": False},
    "quantize": {"stages": []},
    "export": {"precisions": ["fp32"]},
    "verify": {"max_drop": 100.0, "max_escape_rise": 100.0},
    "bench": {"backends": ["onnxruntime"], "batch_sizes": [1], "warmup": 1, "min_time_s": 0.05, "min_runs": 3},
}
GRID = {"base": TINY, "trials": [{"name": "seed 0"}, {"name": "seed 1", "finetune": {"seed": 1}},
                                 {"name": "broken", "prune": {"sparsity": 2.0}}]}


def test_grid_points_combine_trials_with_the_cartesian_grid():
    points = grid_points({"base": {"finetune": {"img_size": 64}},
                          "trials": [{"name": "lite0"}, {"name": "b0", "finetune": {"backbone": "efficientnet_b0"}}],
                          "grid": {"prune.sparsity": [0.3, 0.5]}})
    assert [name for name, _ in points] == ["lite0 prune.sparsity=0.3", "lite0 prune.sparsity=0.5",
                                            "b0 prune.sparsity=0.3", "b0 prune.sparsity=0.5"]
    assert points[3][1] == {"finetune": {"img_size": 64, "backbone": "efficientnet_b0"}, "prune": {"sparsity": 0.5}}
    assert [name for name, _ in grid_points([{"prune": {"method": "l1"}}, {}])] == ["prune.method=l1", "base"]
    for raw, message in (({"grid": {"sparsity": [0.3]}}, "section.key"), ({"grid": {"prune.sparsity": 0.3}}, "list"),
                         ({"trials": [{"name": "a"}, {"name": "a"}]}, "repeat"), ({"trial": [{}]}, "top-level"),
                         ({}, "non-empty")):
        with pytest.raises(ConfigError, match=message):
            grid_points(raw)


def test_best_trial_is_the_most_accurate_within_the_budget():
    rows = [{"name": "slow", "artifact": "x", "latency_ms_p50": 9.0, "balanced_accuracy": 0.95},
            {"name": "fast", "artifact": "x", "latency_ms_p50": 2.0, "balanced_accuracy": 0.90},
            {"name": "tied", "artifact": "x", "latency_ms_p50": 1.0, "balanced_accuracy": 0.90},
            {"name": "none", "artifact": None, "latency_ms_p50": None, "balanced_accuracy": None}]
    assert best_trial(rows, None)["name"] == "slow"
    assert best_trial(rows, 5.0)["name"] == "tied"
    assert best_trial(rows, 0.5) is None


@pytest.mark.skipif(not importable("ray"), reason="Ray is not installed (pip install 'edge-tl[scale]')")
def test_sweep_runs_trials_on_ray_reuses_them_and_reports_the_broken_one(surface_dataset, tmp_path, capsys,
                                                                          monkeypatch, caplog):
    grid, out = tmp_path / "grid.yaml", tmp_path / "sweep"
    grid.write_text(yaml.safe_dump(GRID))
    argv = ["sweep", str(surface_dataset), "--grid", str(grid), "--out", str(out), "--max-latency-ms", "1000"]
    assert main(argv + ["--workers", "2"]) == 1  # a trial failed; the others ran
    assert "1 of 3 trials failed (broken)" in capsys.readouterr().err
    record = json.loads((out / "sweep.json").read_text())
    assert record["scheduler"] == "ray" and record["workers"] == 2
    rows = {row["name"]: row for row in record["rows"]}
    assert rows["broken"]["status"] == "failed" and "sparsity 2.0" in rows["broken"]["error"]
    assert not (out / "trials" / "broken").exists()
    assert len(list((out / "ray").glob("sweep-*/trial-*"))) == 2  # the broken recipe never reached Ray
    for name, run in (("seed 0", "seed-0"), ("seed 1", "seed-1")):
        row = rows[name]
        assert row["status"] == "done" and row["run_dir"] == str(out / "trials" / run)
        assert row["artifact"] == "model.float.fp32.onnx" and row["verdict"] == "PASS" and row["latency_ms_p50"] > 0
        assert row["benched_alone"] is True  # the two ran side by side, then were benched one at a time
        metrics = json.loads((out / "trials" / run / "metrics.json").read_text())
        assert row["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
        assert json.loads((out / "trials" / run / "trial.json").read_text())["row"] == row
    seeds = [json.loads((out / "trials" / run / "run.json").read_text())["config"]["seed"] for run in ("seed-0", "seed-1")]
    assert seeds == [0, 1]
    assert record["best"] == max(record["rows"][:2], key=lambda r: (r["balanced_accuracy"], -r["latency_ms_p50"]))["name"]
    with open(out / "sweep.csv", newline="") as handle:
        assert [line["name"] for line in csv.DictReader(handle)] == ["seed 0", "seed 1", "broken"]
    assert (out / record["plot"]).stat().st_size > 0
    weights = {run: (out / "trials" / run / "model.safetensors").stat().st_mtime_ns for run in ("seed-0", "seed-1")}

    # again, without Ray (the fallback): both trials are reused, not rerun, and the sweep says how it ran
    monkeypatch.setitem(sys.modules, "ray", None)
    with caplog.at_level("WARNING", logger="edge_tl.sweep"):
        assert main(argv) == 1
    assert any("Ray is not installed" in r.getMessage() for r in caplog.records)
    again = json.loads((out / "sweep.json").read_text())
    assert again["scheduler"] == "sequential"
    assert [row["status"] for row in again["rows"]] == ["reused", "reused", "failed"]
    assert {run: (out / "trials" / run / "model.safetensors").stat().st_mtime_ns for run in weights} == weights
    capsys.readouterr()
    # --address needs Ray: refused in one line before any trial
    assert main(argv + ["--address", "head:6379"]) == 2
    assert "--address needs Ray" in capsys.readouterr().err
