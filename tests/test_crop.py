"""The centre-crop preprocessing option: one transform from fine-tuning through calibration, export and verify."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from calibrate.sources import ClassBalancedSource
from edge_tl import data as data_mod
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.finetune import FinetuneConfig, evaluate, finetune, run_records
from edge_tl.verify import artifact_metadata, check_metadata, verify
from export.stage import ExportConfig, export_artifact

PX = 64
CROP = 0.8


def _framed(width: int = 300, height: int = 200) -> Image.Image:
    """A mid-grey part with a black 5% frame: the frame is what a centre crop should drop."""
    array = np.full((height, width, 3), 128, dtype=np.uint8)
    array[: height // 20], array[-height // 20:] = 0, 0
    array[:, : width // 20], array[:, -width // 20:] = 0, 0
    return Image.fromarray(array)


def test_crop_keeps_the_centre_of_the_squashed_image():
    image = _framed()
    whole = np.asarray(data_mod.resize_image(image, PX))
    cropped = np.asarray(data_mod.resize_image(image, PX, CROP))
    assert cropped.shape == whole.shape == (PX, PX, 3)
    assert whole[0, 0, 0] == 0 and whole[PX // 2, PX // 2, 0] == 128
    # squashed to round(64 / 0.8) = 80 px, the centre 64 px kept: the 4 px frame lies in the 8 px dropped
    squashed = np.asarray(image.resize((80, 80), data_mod.RESAMPLE))
    assert np.array_equal(cropped, squashed[8:72, 8:72])
    assert cropped[0, 0, 0] > 100  # the frame is gone
    assert np.array_equal(data_mod.preprocess(image, PX, (0.5,) * 3, (0.5,) * 3, CROP),
                          data_mod.normalize(Image.fromarray(cropped), (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize("crop", [0.3, 1.2, True, "0.8"])
def test_crop_out_of_range_is_a_config_error(crop):
    with pytest.raises(ConfigError, match="--crop"):
        data_mod.resize_image(_framed(), PX, crop)


@pytest.fixture(scope="module")
def cropped_run(surface_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("crop") / "run"
    result = finetune(surface_dataset, out, FinetuneConfig(img_size=PX, epochs=8, augmented_views=1, ok_class="ok",
                                                           crop=CROP))
    return result


def test_every_stage_reads_the_run_crop(cropped_run, surface_dataset, tmp_path):
    run = cropped_run.run_dir
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["crop"] == CROP
    # evaluate on the run's own validation files reproduces fine-tuning's metrics only with the same crop
    val_dir = tmp_path / "val"
    for rel in run_info["split"]["val_files"]:
        (val_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (val_dir / rel).symlink_to(surface_dataset / rel)
    assert evaluate(run, val_dir)["confusion_matrix"] == cropped_run.metrics["confusion_matrix"]
    # calibration batches are the same transform
    record = run_records(run_info, "train")[0]
    source = ClassBalancedSource([record], 1, PX, run_info["mean"], run_info["std"], min_images=1,
                                 crop=data_mod.run_crop(run_info))
    expected = data_mod.preprocess(data_mod.load_image(record.path), PX, run_info["mean"], run_info["std"], CROP)
    assert np.array_equal(source.get_next()["input"][0], expected)


def test_exported_artifact_declares_the_crop_and_verify_feeds_it(cropped_run):
    run = cropped_run.run_dir
    manifest = export_artifact(run, ExportConfig(precision="fp32"))
    metadata = artifact_metadata(manifest["path"])
    assert metadata["crop"] == CROP and "centre crop" in metadata["resize"]
    result = verify(run, manifest["path"], max_drop=100.0, max_escape_rise=100.0)  # a handful of images: wide margins
    assert result["passed"] and result["top1_agreement"] == 1.0
    assert result["balanced_accuracy"] == pytest.approx(cropped_run.metrics["balanced_accuracy"])
    run_info = json.loads((run / "run.json").read_text())
    with pytest.raises(ArtifactError, match="centre crop"):
        check_metadata({**metadata, "crop": 1.0}, run_info, manifest["path"])
