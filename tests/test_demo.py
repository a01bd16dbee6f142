"""`edge-tl demo`: the whole chain with the demo recipe on a (shrunken) generated dataset."""
from __future__ import annotations

import json

import pytest

from edge_tl import synthetic
from edge_tl.cli import main
from edge_tl.demo import MARKER, check_demo_dir
from edge_tl.errors import ArtifactError

SMALL_DEMO = {"ok": 12, "scratch": 6, "spot": 6, "crack": 6}  # the demo's recipe, a tenth of its images


def test_demo_runs_the_chain_and_names_a_verified_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic, "DEMO_IMAGES_PER_CLASS", SMALL_DEMO)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recommended:" in printed
    assert {p.name: len(list(p.iterdir())) for p in (out / "data").iterdir()} == SMALL_DEMO
    run_dir = out / "run"
    verified = {p.name: json.loads(p.read_text()) for p in (run_dir / "verify").glob("*.json")}
    assert sorted(verified) == sorted(f"model.{stage}.{precision}.onnx.json" for stage in ("float", "pruned")
                                      for precision in ("fp32", "fp16", "int8"))
    val_files = json.loads((run_dir / "run.json").read_text())["split"]["val_files"]
    assert {f.split("/")[0] for f in val_files} == set(SMALL_DEMO)  # stratified: every class validated
    assert all(v["num_samples"] == len(val_files) for v in verified.values())
    assert verified["model.float.fp32.onnx.json"]["top1_agreement"] == 1.0
    bench = json.loads((run_dir / "bench.json").read_text())
    recommended = bench["recommended"]["artifact"]
    assert verified[recommended + ".json"]["passed"] is True
    assert recommended in (run_dir / "report.md").read_text()
    assert (out / MARKER).is_file() and check_demo_dir(out) == out


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "part.png").write_bytes(b"not a demo image")
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not made by edge-tl demo" in err and len(err.splitlines()) == 1
    assert [p.name for p in mine.rglob("*")] == ["data", "part.png"]
    with pytest.raises(ArtifactError, match="is a file"):
        check_demo_dir(mine / "data" / "part.png")
    assert check_demo_dir(tmp_path / "new") == tmp_path / "new"
