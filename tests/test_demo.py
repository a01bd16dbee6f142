"""`edge-tl demo`: the whole chain with the demo recipe on a (shrunken) generated dataset."""
from __future__ import annotations

import json

import pytest

from edge_tl import synthetic
from edge_tl.cli import main
from edge_tl.demo import MARKER, check_demo_dir
from edge_tl.errors import ArtifactError

SMALL_DEMO = {"ok": 12, "scratch": 6, "spot": 6, "crack": 6}  # the demo's recipe, a tenth of its images


def test_demo_runs_the_chain_and_verifies_every_artifact(tmp_path, monkeypatch, capsys):
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
    # a tenth of the demo (6 validation images) cannot show a 2-point escape margin, even with the
    # training split as label-free evidence: nothing is recommended, and the report says what would settle it
    assert {v["verdict"] for v in verified.values()} == {"INCONCLUSIVE"}
    assert all(v["unlabelled"]["source"] == "train" for v in verified.values())
    bench = json.loads((run_dir / "bench.json").read_text())
    assert bench["recommended"]["artifact"] is None
    assert all(reason.startswith("verification INCONCLUSIVE") for reason in bench["recommended"]["rejected"].values())
    assert "recommended: none (no artifact passed verification)" in printed
    assert "What would settle the INCONCLUSIVE ones:" in (run_dir / "report.md").read_text()
    # the release gate of `edge-tl run` keys on it: the same run again, resumed, exits 1 with --gate
    assert main(["run", str(out / "data"), "--out", str(run_dir), "--recipe", str(run_dir / "recipe.yaml"),
                 "--gate"]) == 1
    assert "--gate: none of the 6 artifacts passed verification (6 INCONCLUSIVE)" in capsys.readouterr().err
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
