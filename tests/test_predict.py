"""edge-tl predict: class probabilities of unlabelled images from an ONNX artifact or a run directory."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from edge_tl.cli import main
from edge_tl.errors import ConfigError, DatasetError
from edge_tl.finetune import (
    FinetuneConfig,
    finetune,
    load_checkpoint,
    predict_logits,
    run_records,
)
from edge_tl.predict import collect_images, predict
from edge_tl.verify import artifact_predictions
from export.stage import ExportConfig, export_artifact

PX = 64


@pytest.fixture(scope="module")
def exported(surface_dataset, tmp_path_factory):
    """A fine-tuned run (centre crop 0.9, so the artifact's metadata must carry it) and its FP32 ONNX export."""
    run = tmp_path_factory.mktemp("predict") / "run"
    finetune(surface_dataset, run, FinetuneConfig(img_size=PX, epochs=8, augmented_views=1, ok_class="ok", crop=0.9))
    return run, export_artifact(run, ExportConfig(precision="fp32"))["path"]


@pytest.fixture
def images(exported, tmp_path):
    """The run's validation images in a plain folder (no class sub-folders), plus a hidden file."""
    run, _ = exported
    folder = tmp_path / "line"
    folder.mkdir()
    records = run_records(json.loads((run / "run.json").read_text()), "val")
    for index, record in enumerate(records):
        shutil.copy(record.path, folder / f"{index:03d}{record.path.suffix}")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder, records


def test_artifact_predictions_match_verify_and_the_run(exported, images, tmp_path):
    run, artifact = exported
    folder, records = images
    result = predict(artifact, [folder], tmp_path / "p.csv")
    assert result.backend == "onnxruntime" and len(result.rows) == len(records) and not result.skipped
    verified = artifact_predictions(run, artifact).logits.argmax(1)
    classes = result.classes
    assert [row["predicted"] for row in result.rows] == [classes[i] for i in verified]
    for row in result.rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == max(row["probabilities"].values())
    with (tmp_path / "p.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(records) and table[0]["predicted"] == result.rows[0]["predicted"]
    assert set(table[0]) == {"file", "predicted", "probability", *[f"p_{name}" for name in classes]}
    # the run directory (PyTorch, the same crop from run.json) predicts the same classes
    from_run = predict(run, [folder], tmp_path / "p.json")
    assert from_run.backend == "torch"
    assert [row["predicted"] for row in from_run.rows] == [row["predicted"] for row in result.rows]
    model, info = load_checkpoint(run)
    logits = predict_logits(model, records, PX, info["mean"], info["std"], crop=0.9)
    assert [row["predicted"] for row in from_run.rows] == [classes[i] for i in logits.argmax(1)]
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["ok_class"] == "ok" and len(saved["rows"]) == len(records)
    assert main(["predict", str(artifact), str(folder), "--out", str(tmp_path / "cli.csv")]) == 0
    assert (tmp_path / "cli.csv").read_text() == (tmp_path / "p.csv").read_text()


def test_corrupt_images_are_skipped_or_an_error_with_strict(exported, images, tmp_path):
    _, artifact = exported
    folder, records = images
    (folder / "broken.png").write_bytes(b"not a png")
    result = predict(artifact, [folder])
    assert len(result.rows) == len(records) and [name for name, _ in result.skipped] == [str(folder / "broken.png")]
    with pytest.raises(DatasetError, match="broken.png"):
        predict(artifact, [folder], strict=True)
    assert main(["predict", str(artifact), str(folder), "--strict"]) == 2


def test_bad_arguments_are_one_line_errors(exported, images, tmp_path, capsys):
    _, artifact = exported
    folder, _ = images
    with pytest.raises(ConfigError, match=".csv or .json"):
        predict(artifact, [folder], tmp_path / "p.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        collect_images([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(artifact), str(empty)]) == 2
    assert main(["predict", str(tmp_path / "nope.onnx"), str(folder)]) == 2
    assert main(["predict", str(tmp_path), str(folder)]) == 2  # a folder without run.json
    err = capsys.readouterr().err
    assert "no image files" in err and "does not exist" in err and "has no run.json" in err
    assert "Traceback" not in err and not (tmp_path / "p.txt").exists()
