"""Image-folder scanning and validation, consistent RGB conversion, stratified split, transforms."""
from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_tl.data import (
    ImageRecord,
    augment,
    class_weights,
    file_list_hash,
    load_image,
    load_tensor_batch,
    preprocess,
    scan_image_folder,
    split_stratified,
)
from edge_tl.errors import ArtifactError, ConfigError, DatasetError
from edge_tl.synthetic import make_surface_dataset, make_surface_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_images(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (size, size), (index * 30 % 256, 80, 40)).save(root / name / f"{name}_{index}.png")
    return root


def _truncated_png(path: Path) -> Path:
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------- scanning


def test_scan_of_generated_dataset(surface_dataset):
    scan = scan_image_folder(surface_dataset)
    assert scan.root == surface_dataset
    assert scan.classes == ("crack", "ok", "scratch", "spot")
    assert scan.counts() == {"crack": 12, "ok": 12, "scratch": 12, "spot": 12}
    assert scan.skipped == ()
    for record in scan.records:
        assert record.path.parent.name == scan.classes[record.label]
    assert [str(r.path) for r in scan.records] == sorted(str(r.path) for r in scan.records)


def test_hidden_and_non_image_files_are_ignored(tmp_path, caplog):
    root = _write_images(tmp_path / "data", {"ok": 3, "dent": 2})
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "ok" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "ok" / "._ok_0.png").write_bytes(b"AppleDouble resource fork")  # hidden, image-like name
    (root / "ok" / "notes.txt").write_text("not an image")
    (root / "ok" / "labels.csv").write_text("a,b")
    (root / ".git").mkdir()  # hidden folder: not a class
    _write_images(root / ".git", {"objects": 3})
    _write_images(root / "dent" / ".thumbnails", {"x": 4})  # hidden sub-folder inside a class
    Image.new("L", (20, 20), 7).save(root / "dent" / "upper_case.PNG")  # extensions are case-insensitive
    _write_images(root / "dent" / "batch2", {"more": 1})  # nested folders are part of the class

    with caplog.at_level(logging.WARNING):
        scan = scan_image_folder(root)
    assert scan.classes == ("dent", "ok")
    assert scan.counts() == {"dent": 4, "ok": 3}
    assert scan.skipped == ()
    assert caplog.records == []
    names = {r.path.name for r in scan.records}
    assert "upper_case.PNG" in names and "more_0.png" in names and "._ok_0.png" not in names


def test_corrupt_files_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    root = _write_images(tmp_path / "data", {"ok": 3, "crack": 3})
    _truncated_png(root / "ok" / "cut_off.png")
    (root / "crack" / "garbage.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="edge_tl.data"):
        scan = scan_image_folder(root)
    assert scan.counts() == {"crack": 3, "ok": 3}
    assert {path.name for path, _ in scan.skipped} == {"cut_off.png", "garbage.jpg"}
    assert all(reason for _, reason in scan.skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 2 unreadable" in message
    assert "ok/cut_off.png" in message and "crack/garbage.jpg" in message
    assert "\n" not in message


def test_strict_turns_unreadable_files_into_an_error(tmp_path):
    root = _write_images(tmp_path / "data", {"ok": 3, "crack": 3})
    _truncated_png(root / "ok" / "cut_off.png")
    with pytest.raises(DatasetError) as info:
        scan_image_folder(root, strict=True)
    message = str(info.value)
    assert "1 unreadable image" in message and "ok/cut_off.png" in message and "--strict" in message
    assert "\n" not in message


def _case_missing(root: Path) -> None:
    pass


def _case_file(root: Path) -> None:
    root.write_text("not a folder")


def _case_empty(root: Path) -> None:
    root.mkdir()


def _case_loose_images(root: Path) -> None:
    root.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8)).save(root / f"{index}.png")


def _case_single_class(root: Path) -> None:
    _write_images(root, {"ok": 5})


def _case_tiny_class(root: Path) -> None:
    _write_images(root, {"ok": 5, "crack": 1})


def _case_empty_class(root: Path) -> None:
    _write_images(root, {"ok": 5, "crack": 0, "spot": 1})


def _case_class_left_tiny_by_corrupt_file(root: Path) -> None:
    _write_images(root, {"ok": 5, "crack": 1})
    _truncated_png(root / "crack" / "broken.png")


def _case_all_unreadable(root: Path) -> None:
    for name in ("ok", "crack"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            (root / name / f"{index}.png").write_bytes(b"not an image")


def _case_no_image_files(root: Path) -> None:
    for name in ("ok", "crack"):
        (root / name).mkdir(parents=True)
        (root / name / "readme.txt").write_text("images go here")


@pytest.mark.parametrize(
    "make, expected",
    [
        (_case_missing, ["does not exist"]),
        (_case_file, ["is a file, not a folder"]),
        (_case_empty, ["no class sub-folders"]),
        (_case_loose_images, ["no class sub-folders", "holds 3 images directly"]),
        (_case_single_class, ["only one class (ok)", "at least 2"]),
        (_case_tiny_class, ["fewer than 2 readable images", "crack (1)", "add images"]),
        (_case_empty_class, ["crack (0)", "spot (1)"]),
        (_case_class_left_tiny_by_corrupt_file, ["crack (1)"]),
        (_case_all_unreadable, ["no readable image", "all 4 image files are unreadable"]),
        (_case_no_image_files, ["no readable image", "no image files found", ".png"]),
    ],
    ids=lambda value: getattr(value, "__name__", "")[6:] or None,
)
def test_bad_folders_raise_one_line_dataset_errors(make, expected, tmp_path):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DatasetError) as info:
        scan_image_folder(root)
    message = str(info.value)
    assert str(root) in message
    for part in expected:
        assert part in message
    assert "\n" not in message


# ---------------------------------------------------------------- conversion


def _gray_content() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:40]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def _save_variants(gray: np.ndarray, folder: Path) -> dict[str, Path]:
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    opaque = np.full_like(gray, 255)
    variants = {
        "L.png": Image.fromarray(gray),
        "RGB.png": Image.fromarray(rgb),
        "RGBA.png": Image.fromarray(np.dstack([rgb, opaque])),
        "LA.png": Image.fromarray(np.dstack([gray, opaque])),
        "I16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "I32.tif": Image.fromarray(gray.astype(np.int32) * 257),
        "F.tif": Image.fromarray(gray.astype(np.float32) / 255),
        "P.png": Image.fromarray(gray).convert("P"),
        "RGB.bmp": Image.fromarray(rgb),
        "L.tiff": Image.fromarray(gray),
        "L.webp": None,  # lossy by default; saved lossless below
    }
    paths = {}
    for name, image in variants.items():
        paths[name] = folder / name
        if name == "L.webp":
            Image.fromarray(rgb).save(paths[name], lossless=True)
        else:
            image.save(paths[name])
    return paths


def _file_mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def test_every_file_mode_gives_the_same_rgb(tmp_path):
    gray = _gray_content()
    expected = np.repeat(gray[:, :, None], 3, axis=2).astype(np.int16)
    paths = _save_variants(gray, tmp_path)
    modes = {name: _file_mode(path) for name, path in paths.items()}
    assert modes["I16.png"].startswith("I;16") and modes["I32.tif"] == "I" and modes["F.tif"] == "F"
    assert modes["RGBA.png"] == "RGBA" and modes["LA.png"] == "LA" and modes["P.png"] == "P"
    for name, path in paths.items():
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (40, 32), name
        difference = np.abs(np.asarray(image).astype(np.int16) - expected).max()
        assert difference <= 1, f"{name} ({modes[name]}) differs by {difference} levels"


def test_16_bit_is_scaled_by_bit_depth_not_by_content(tmp_path):
    values = np.array([[0, 257, 1000, 4112], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "dark16.png")
    array = np.asarray(load_image(tmp_path / "dark16.png"))
    np.testing.assert_array_equal(array[:, :, 0], [[0, 1, 4, 16], [128, 156, 254, 255]])
    assert (array == array[:, :, :1]).all()


def test_transparency_is_composited_over_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :2, 3] = 0
    rgba[:, 2, 3] = 255
    rgba[:, 3, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    array = np.asarray(load_image(tmp_path / "alpha.png")).astype(int)
    assert (array[:, :2] == 0).all()
    assert (array[:, 2] == (200, 100, 50)).all()
    assert np.abs(array[:, 3] - np.array([100, 50, 25])).max() <= 1


def test_palette_with_transparent_index_is_composited_over_black(tmp_path):
    image = Image.new("P", (2, 2), 0)
    image.putpalette([250, 250, 250, 10, 20, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "palette.png", transparency=0)
    array = np.asarray(load_image(tmp_path / "palette.png"))
    np.testing.assert_array_equal(array[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(array[1, 1], [10, 20, 30])


def test_unreadable_file_is_a_dataset_error_naming_it(tmp_path):
    path = _truncated_png(tmp_path / "half.png")
    with pytest.raises(DatasetError, match="half.png"):
        load_image(path)


# ---------------------------------------------------------------- split and hash


def _records(sizes: dict[int, int]) -> list[ImageRecord]:
    return [
        ImageRecord(Path("/data") / f"class{label}" / f"{index:03d}.png", label)
        for label, count in sizes.items()
        for index in range(count)
    ]


def _per_class(records) -> dict[int, int]:
    counts: dict[int, int] = {}
    for record in records:
        counts[record.label] = counts.get(record.label, 0) + 1
    return counts


def test_split_is_stratified_with_every_class_in_both_splits():
    records = _records({0: 10, 1: 5, 2: 2, 3: 3, 4: 41})
    train, val = split_stratified(records, val_fraction=0.2, seed=0)
    assert _per_class(val) == {0: 2, 1: 1, 2: 1, 3: 1, 4: 8}
    assert _per_class(train) == {0: 8, 1: 4, 2: 1, 3: 2, 4: 33}
    assert set(train).isdisjoint(val)
    assert sorted(map(str, (r.path for r in train + val))) == sorted(str(r.path) for r in records)
    _, val_half = split_stratified(records, val_fraction=0.5, seed=0)
    assert _per_class(val_half) == {0: 5, 1: 2, 2: 1, 3: 2, 4: 20}  # round half to even, clamped to n-1


def test_split_is_deterministic_and_independent_of_input_order():
    records = _records({0: 20, 1: 12, 2: 6})
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    first = split_stratified(records, seed=7)
    assert split_stratified(shuffled, seed=7) == first
    assert split_stratified(records, seed=7) == first
    other_train, other_val = split_stratified(records, seed=8)
    assert other_val != first[1]
    assert _per_class(other_val) == _per_class(first[1])


def test_split_rejects_bad_fraction_and_tiny_classes():
    with pytest.raises(ConfigError, match="val_fraction 1.0"):
        split_stratified(_records({0: 4, 1: 4}), val_fraction=1.0)
    with pytest.raises(ConfigError):
        split_stratified(_records({0: 4, 1: 4}), val_fraction=0.0)
    with pytest.raises(DatasetError, match="class 1 has 1 image"):
        split_stratified(_records({0: 4, 1: 1}))


def test_file_list_hash_is_stable_and_tracks_the_file_list():
    records = _records({0: 3, 1: 2})
    lines = sorted(f"{r.label}/class{r.label}/{r.path.name}" for r in records)
    expected = hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()
    assert file_list_hash(records, "/data") == expected
    assert file_list_hash(list(reversed(records)), Path("/data")) == expected
    moved = [ImageRecord(Path("/elsewhere") / r.path.relative_to("/data"), r.label) for r in records]
    assert file_list_hash(moved, "/elsewhere") == expected
    assert file_list_hash(records[:-1], "/data") != expected
    relabelled = [ImageRecord(records[0].path, 1), *records[1:]]
    assert file_list_hash(relabelled, "/data") != expected


# ---------------------------------------------------------------- transforms


def test_preprocess_normalises_and_squashes_without_cropping():
    image = Image.new("RGB", (60, 30), (255, 0, 128))
    image.paste((0, 255, 0), (0, 0, 6, 30))  # a bright green band on the left border
    tensor = preprocess(image, 32, MEAN, STD)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[:, 16, 31], (np.array([255, 0, 128]) / 255 - MEAN) / STD, atol=1e-6)
    np.testing.assert_allclose(tensor[:, 16, 0], (np.array([0, 255, 0]) / 255 - MEAN) / STD, atol=1e-6)


def test_augment_keeps_shape_dtype_and_uses_every_orientation():
    base = np.full((8, 8, 3), 100, dtype=np.uint8)
    base[0, 1] = 255  # one marker pixel: its position tells which flip/rotation was applied
    image = Image.fromarray(base)
    positions, levels = set(), []
    for seed in range(64):
        out = augment(image, np.random.default_rng(seed))
        array = np.asarray(out)
        assert out.mode == "RGB" and out.size == (8, 8) and array.dtype == np.uint8
        marker = np.unravel_index(array[..., 0].argmax(), (8, 8))
        positions.add(tuple(int(v) for v in marker))
        background = array[..., 0][array[..., 0] < array[..., 0].max()]
        levels.append(float(background.mean()))
    assert positions == {(0, 1), (1, 0), (0, 6), (6, 0), (7, 1), (1, 7), (7, 6), (6, 7)}  # all 8 symmetries
    assert 100 * 0.85 < min(levels) < 95 and 105 < max(levels) < 100 * 1.15  # mild brightness/contrast
    again = [np.asarray(augment(image, np.random.default_rng(5))) for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])


def test_augment_keeps_non_square_images_their_shape():
    image = Image.new("RGB", (12, 6), (90, 90, 90))
    for seed in range(16):
        assert augment(image, np.random.default_rng(seed)).size == (12, 6)


def test_load_tensor_batch_plain_and_augmented(surface_dataset):
    records = scan_image_folder(surface_dataset).records[::6]
    plain = load_tensor_batch(records, 48, MEAN, STD)
    assert plain.shape == (len(records), 3, 48, 48) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain[0], preprocess(load_image(records[0].path), 48, MEAN, STD))
    augmented = load_tensor_batch(records, 48, MEAN, STD, rng=np.random.default_rng(0))
    assert augmented.shape == plain.shape and augmented.dtype == np.float32
    assert not np.allclose(augmented, plain)
    np.testing.assert_array_equal(augmented, load_tensor_batch(records, 48, MEAN, STD, rng=np.random.default_rng(0)))


def test_class_weights_are_inverse_frequency_with_mean_one():
    np.testing.assert_allclose(class_weights([0, 0, 0, 1], 2), [0.5, 1.5])
    np.testing.assert_allclose(class_weights([0, 0, 1, 1, 1, 1], 3), [4 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(class_weights([2, 0, 1, 2, 0, 1], 3), [1.0, 1.0, 1.0])
    assert class_weights([0, 1], 2).dtype == np.float32


# ---------------------------------------------------------------- synthetic data and real data


def test_synthetic_dataset_is_deterministic_and_refuses_to_overwrite(tmp_path):
    started = time.perf_counter()
    first = make_surface_dataset(tmp_path / "a", {"ok": 3, "crack": 2}, img_size=48, seed=1)
    second = make_surface_dataset(tmp_path / "b", {"ok": 3, "crack": 2}, img_size=48, seed=1)
    third = make_surface_dataset(tmp_path / "c", {"ok": 3, "crack": 2}, img_size=48, seed=2)
    assert time.perf_counter() - started < 5
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png")) == [
        "crack/crack_0.png", "crack/crack_1.png", "ok/ok_0.png", "ok/ok_1.png", "ok/ok_2.png"]
    for path in first.rglob("*.png"):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()
    assert (first / "ok/ok_0.png").read_bytes() != (third / "ok/ok_0.png").read_bytes()
    assert load_image(first / "ok/ok_0.png").size == (48, 48)
    with pytest.raises(ArtifactError, match="not empty"):
        make_surface_dataset(first, 2)
    with pytest.raises(ConfigError, match="'dent'"):
        make_surface_dataset(tmp_path / "d", {"dent": 2})
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_synthetic_defects_change_the_surface():
    # Same seed, same surface: the defect is the only difference between classes.
    plain = np.asarray(make_surface_image("ok", 64, np.random.default_rng(4)), dtype=np.int16)
    for kind in ("scratch", "spot", "crack"):
        marked = np.asarray(make_surface_image(kind, 64, np.random.default_rng(4)), dtype=np.int16)
        changed = np.abs(marked - plain).max(axis=2) > 8
        assert 8 < changed.sum() < 0.25 * 64 * 64, kind


@pytest.mark.dataset
def test_scan_of_real_magnetic_tile_data(magnetic_tile_dir):
    scan = scan_image_folder(magnetic_tile_dir)
    assert scan.counts() == {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "free": 952, "uneven": 103}
    assert scan.skipped == ()
    image = np.asarray(load_image(scan.records[0].path))
    assert image.ndim == 3 and image.shape[2] == 3
    assert (image == image[:, :, :1]).all()  # grayscale JPEG replicated to 3 equal channels


# ---------------------------------------------------------------- hostile layouts: linked folders and files


def test_a_link_to_the_parent_is_a_loop_error_not_more_images(tmp_path):
    root = make_surface_dataset(tmp_path / "data", images_per_class=6, img_size=32)
    assert scan_image_folder(root).counts() == {"crack": 6, "ok": 6, "scratch": 6, "spot": 6}
    (root / "ok" / "up").symlink_to("..")
    with pytest.raises(DatasetError, match=r"ok/up links back to .* \(a link loop\); remove the link"):
        scan_image_folder(root)


def test_images_reached_through_two_classes_are_an_error(tmp_path):
    root = make_surface_dataset(tmp_path / "data", images_per_class=6, img_size=32)
    (root / "ok" / "cracks").symlink_to(root / "crack")
    with pytest.raises(DatasetError, match="ok/cracks leads into .*crack, the folder of class crack"):
        scan_image_folder(root)
    (root / "ok" / "cracks").unlink()
    (root / "ok" / "borrowed.png").symlink_to(sorted((root / "crack").iterdir())[0])
    with pytest.raises(DatasetError, match="borrowed.png is the image .* of class crack too"):
        scan_image_folder(root)


def test_a_linked_folder_is_followed_once(tmp_path):
    root = make_surface_dataset(tmp_path / "data", images_per_class=6, img_size=32)
    outside = tmp_path / "more"
    outside.mkdir()
    for index, path in enumerate(sorted((root / "ok").iterdir())[:3]):
        shutil.copy(path, outside / f"extra_{index}.png")
    (root / "ok" / "more").symlink_to(outside)
    (root / "ok" / "again").symlink_to(outside)  # the same folder a second time: skipped
    assert scan_image_folder(root).counts()["ok"] == 9
