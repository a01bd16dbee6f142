"""The CLI in-process through main(argv): exit codes, one-line errors, nothing left on disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from edge_tl.cli import main


def _make_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (size, size), (index * 20 % 255, 90, 30)).save(root / name / f"{index}.png")
    return root


def _run_error(argv, capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("empty", "no class"),
        ("single", "one class"),
        ("tiny_class", "fewer than 2"),
        ("unreadable", "no readable image"),
    ],
)
def test_bad_datasets_are_one_line_errors(case, expected, tmp_path, capsys):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "single":
        _make_folder(data, {"ok": 4})
    elif case == "tiny_class":
        _make_folder(data, {"ok": 4, "crack": 1})
    elif case == "unreadable":
        for name in ("ok", "crack"):
            (data / name).mkdir(parents=True)
            for index in range(3):
                (data / name / f"{index}.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    line = _run_error(["finetune", str(data), "--out", str(out), "--img-size", "64"], capsys)
    assert expected in line.lower()
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--backbone", "resnet_9000"], "resnet_9000"),
        (["--img-size", "70"], "70"),
        (["--ok-class", "nothing"], "nothing"),
    ],
)
def test_bad_settings_are_one_line_errors(extra, expected, tmp_path, capsys):
    data = _make_folder(tmp_path / "data", {"ok": 3, "crack": 3})
    out = tmp_path / "run"
    line = _run_error(["finetune", str(data), "--out", str(out), "--img-size", "64", *extra], capsys)
    assert expected in line
    assert not out.exists()


def test_existing_run_dir_needs_force(tmp_path, capsys):
    data = _make_folder(tmp_path / "data", {"ok": 3, "crack": 3})
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    line = _run_error(["finetune", str(data), "--out", str(out), "--img-size", "64"], capsys)
    assert "--force" in line
    assert (out / "keep.txt").read_text() == "earlier run"


def test_finetune_and_evaluate_from_the_cli(surface_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(surface_dataset), "--out", str(out), "--img-size", "64", "--epochs", "2",
            "--ok-class", "ok"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and "escape rate" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ok_class"] == "ok"

    # Overwriting with --force replaces the run; evaluate writes RUN_DIR/evaluation.json.
    assert main([*argv, "--force"]) == 0
    assert main(["evaluate", str(out), str(surface_dataset)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["classes"] == metrics["classes"]

    # Evaluating on a folder with other class names is a clear error.
    other = tmp_path / "other"
    shutil.copytree(surface_dataset, other)
    (other / "crack").rename(other / "dent")
    line = _run_error(["evaluate", str(out), str(other)], capsys)
    assert "same class" in line
