"""Group-aware splits and folds: every image of one part on one side (--group-pattern)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from edge_tl.cli import main
from edge_tl.crossval import cross_validate
from edge_tl.data import scan_image_folder, split_stratified
from edge_tl.errors import ConfigError, DatasetError
from edge_tl.finetune import FinetuneConfig, finetune
from edge_tl.groups import group_folds, group_keys, split_by_group, split_groups

PATTERN = r"part(\d+)_"


@pytest.fixture(scope="module")
def shots(surface_dataset, tmp_path_factory):
    """Each generated image as a part photographed twice (the second shot mirrored): part07_a.png, part07_b.png."""
    root = tmp_path_factory.mktemp("groups") / "data"
    for class_dir in sorted(p for p in surface_dataset.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for index, path in enumerate(sorted(class_dir.iterdir())):
            image = Image.open(path).convert("RGB")
            image.save(root / class_dir.name / f"part{index:02d}_a.png")
            ImageOps.mirror(image).save(root / class_dir.name / f"part{index:02d}_b.png")
    return root


def _parts(files) -> set[str]:
    return {f"{rel.split('/')[0]}/{re.search(PATTERN, rel).group(1)}" for rel in files}


def test_group_keys_take_the_capture_group_the_match_or_the_name():
    names = ["a/part07_cam1.png", "part07_cam2.png", "part12_x.png", "other.png"]
    assert group_keys(names, PATTERN) == ["07", "07", "12", "other.png"]
    assert group_keys(names, r"part\d+") == ["part07", "part07", "part12", "other.png"]
    with pytest.raises(ConfigError, match="not a regular expression"):
        group_keys(names, "part(")


def test_split_and_folds_keep_groups_whole():
    labels = np.repeat([0, 1], [30, 12])
    keys = [f"g{i // 3}" for i in range(30)] + [f"h{i // 4}" for i in range(12)]
    in_val = split_groups(labels, keys, 0.2, seed=0, class_names=["a", "b"])
    for key in set(keys):
        members = in_val[[k == key for k in keys]]
        assert members.all() or not members.any()
    assert in_val[labels == 0].sum() == 6 and 1 <= in_val[labels == 1].sum() <= 8
    folds = group_folds(labels, keys, 3, seed=0)
    for key in set(keys):
        assert len(set(folds[[k == key for k in keys]])) == 1
    assert sorted(np.bincount(folds[labels == 0], minlength=3)) == [9, 9, 12]
    with pytest.raises(DatasetError, match="class b has a single group"):
        split_groups(labels, keys[:30] + ["same"] * 12, 0.2, seed=0, class_names=["a", "b"])


def test_finetune_and_cv_keep_a_part_on_one_side(shots, tmp_path):
    records = scan_image_folder(shots).records
    train, val = split_stratified(records, 0.25, seed=0)  # by image: both shots of some parts on both sides
    by_image = _parts(str(r.path.relative_to(shots)) for r in train) & _parts(str(r.path.relative_to(shots)) for r in val)
    assert by_image
    train, val = split_by_group(records, 0.25, 0, PATTERN, scan_image_folder(shots).classes)
    assert len(train) + len(val) == len(records) and len(val) == 24
    result = finetune(shots, tmp_path / "run", FinetuneConfig(img_size=64, epochs=4, augmented_views=0,
                                                              ok_class="ok", group_pattern=PATTERN, val_fraction=0.25))
    split = json.loads((result.run_dir / "run.json").read_text())["split"]
    assert split["group_pattern"] == PATTERN and not (_parts(split["train_files"]) & _parts(split["val_files"]))
    cv = cross_validate(shots, FinetuneConfig(img_size=64, augmented_views=0, ok_class="ok", group_pattern=PATTERN),
                        folds=3)
    assert cv["pooled"]["num_samples"] == len(records)
    assert main(["cv", str(shots), "--img-size", "64", "--group-pattern", PATTERN, "--folds", "13"]) == 2
    assert main(["finetune", str(shots), "--out", str(tmp_path / "bad"), "--group-pattern", "part("]) == 2
    assert not (tmp_path / "bad").exists()
