"""Image folders: scanning and validation, seeded stratified split, preprocessing and augmentation.

The dataset layout is torchvision's ``ImageFolder``: one sub-folder per class, class names sorted,
label = index in that order. Every image is converted to 8-bit RGB the same way whatever its file
mode (see :func:`load_image`), then resized once to a square, optionally augmented, and normalised
with the backbone's mean/std (see :func:`load_tensor_batch`).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_tl.artifacts import sha256_text
from edge_tl.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MIN_IMAGES_PER_CLASS = 2
MIN_CROP = 0.5  # centre-crop fractions below this would drop most of a part
RESAMPLE = Image.Resampling.BILINEAR  # the one resize filter every stage uses (Pillow's, antialiased)
_LISTED_NAMES = 20
_LAYOUT = "one sub-folder of images per class"
_ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRecord:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass(frozen=True)
class DatasetScan:
    """A validated image folder: sorted class names, readable images, and the files skipped."""

    root: Path
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[Path, str], ...] = ()

    def counts(self) -> dict[str, int]:
        """Readable images per class, in class order."""
        per_label = Counter(record.label for record in self.records)
        return {name: per_label.get(index, 0) for index, name in enumerate(self.classes)}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def image_files(folder: Path, others: dict[Path, str] | None = None) -> list[Path]:
    """Image files under a folder (recursively, like ImageFolder; sorted), hidden entries skipped.

    Linked folders are followed at most once: a link into a folder already scanned is skipped, a
    link back to the folder itself or one above it (a loop) is a DatasetError, and so is a link into
    one of ``others`` (resolved folder -> name: the other class folders of a dataset).
    """
    found: list[Path] = []
    visited: set[Path] = set()
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(current).resolve()
        visited.add(here)
        kept = []
        for name in sorted(name for name in dirnames if not _is_hidden(name)):
            entry = Path(current) / name
            target = entry.resolve()
            if here.is_relative_to(target):
                raise DatasetError(f"{entry} links back to {target}, a folder it is inside (a link loop); "
                                   "remove the link or point it outside the dataset")
            for root, other in (others or {}).items():
                if target.is_relative_to(root):
                    raise DatasetError(f"{entry} leads into {root}, the folder of class {other}: an image belongs to "
                                       "one class folder; remove the link or copy the images")
            if target in visited:
                logger.warning("skipping %s: it leads to %s, already scanned", entry, target)
                continue
            visited.add(target)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if not _is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(current) / name)
    return found


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found under folders (recursively, sorted, hidden entries skipped)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(image_files(path))
        elif path.is_file():
            found.append(path)
        else:
            raise DatasetError(f"{path} does not exist; pass image files or folders of images")
    if not found:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                           f"{', '.join(str(item) for item in inputs)}; pass image files or folders of images")
    return found


def _name_list(items: Sequence[tuple[Path, str]], root: Path) -> str:
    shown = [f"{_relative(path, root)} ({reason})" for path, reason in items[:_LISTED_NAMES]]
    if len(items) > _LISTED_NAMES:
        shown.append(f"and {len(items) - _LISTED_NAMES} more")
    return ", ".join(shown)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_error(path: Path) -> str | None:
    """None when the file decodes to an RGB image, else the reason it does not."""
    try:
        load_image(path)
    except DatasetError as err:
        if isinstance(err.__cause__, UnidentifiedImageError):
            return "not a recognised image format"
        return str(err.__cause__ or err)
    return None


def scan_image_folder(root: str | os.PathLike, strict: bool = False) -> DatasetScan:
    """Find and validate the classes and images of an ImageFolder-style directory.

    Every candidate image is decoded once, so truncated and corrupt files are caught here, before
    any training. Unreadable files are skipped with one warning naming them (an error if ``strict``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; pass a folder with {_LAYOUT}")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file, not a folder; pass a folder with {_LAYOUT}")
    classes = tuple(sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not _is_hidden(entry.name)))
    if not classes:
        loose = sum(1 for entry in root.iterdir() if entry.suffix.lower() in IMAGE_EXTENSIONS)
        hint = f" (it holds {loose} images directly)" if loose else ""
        raise DatasetError(
            f"dataset folder {root} has no class sub-folders{hint}; put each class's images in its own "
            f"sub-folder, e.g. {root / 'ok'} and {root / 'defect'}"
        )
    if len(classes) == 1:
        raise DatasetError(
            f"dataset folder {root} has only one class ({classes[0]}); a classifier needs at least 2 class "
            "sub-folders, e.g. one for good parts and one per defect type"
        )
    records, skipped, candidates = [], [], 0
    class_roots = {(root / name).resolve(): name for name in classes}
    owners: dict[Path, str] = {}  # each image file (resolved) -> the class folder it was found in
    for label, name in enumerate(classes):
        others = {folder: other for folder, other in class_roots.items() if other != name}
        for path in image_files(root / name, others):
            real = path.resolve()
            if owners.setdefault(real, name) != name:
                raise DatasetError(f"{path} is the image {real} of class {owners[real]} too: an image belongs to one "
                                   "class folder; remove the link or copy the file")
            candidates += 1
            reason = _read_error(path)
            if reason is None:
                records.append(ImageRecord(path, label))
            else:
                skipped.append((path, reason))
    if skipped and strict:
        raise DatasetError(
            f"{len(skipped)} unreadable image(s) in {root}: {_name_list(skipped, root)}; "
            "fix or remove them, or run without --strict to skip them"
        )
    if skipped:
        logger.warning("skipped %d unreadable image(s) in %s: %s", len(skipped), root, _name_list(skipped, root))
    if not records:
        found = f"all {candidates} image files are unreadable" if candidates else "no image files found"
        raise DatasetError(
            f"no readable image in {root} ({found}); supported extensions are "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} inside one sub-folder per class"
        )
    scan = DatasetScan(root, classes, tuple(records), tuple(skipped))
    too_few = [f"{name} ({count})" for name, count in scan.counts().items() if count < MIN_IMAGES_PER_CLASS]
    if too_few:
        raise DatasetError(
            f"class(es) with fewer than {MIN_IMAGES_PER_CLASS} readable images in {root}: {', '.join(too_few)}; "
            "every class needs one image for training and one for validation: add images or remove the folder"
        )
    return scan


def _to_uint8_gray(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grayscale array to 0..255 by its bit depth, not its content.

    16-bit data (``I;16*`` modes, and ``I`` images whose values fit 0..65535, which is how Pillow
    opens 16-bit PNG/TIFF) is divided by 257 and rounded, so 8-bit content stored as ``v * 257``
    comes back exactly. Wider ``I`` data is scaled by the signed 32-bit range. ``F`` data in [0, 1]
    is multiplied by 255; other float data is read as 8-bit values if it fits 0..255, else as 16-bit.
    """
    data = array.astype(np.float64)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode == "F":
        full_scale = 1.0 if low >= 0.0 and high <= 1.0 else 255.0 if low >= 0.0 and high <= 255.0 else 65535.0
    elif mode.startswith("I;16") or (low >= 0 and high <= 65535):
        full_scale = 65535.0
    else:
        full_scale = float(2**31 - 1)
    return np.rint(np.clip(data, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8_gray(np.asarray(image), mode)).convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to 8-bit RGB, the same way for every file mode.

    Grayscale (``L``, ``1``) is replicated to 3 channels; 16-bit and 32-bit grayscale is scaled by
    its bit depth (16-bit: value / 257, rounded); images with transparency (``LA``, ``RGBA``, ``P``
    with a transparent colour) are composited over black; CMYK, YCbCr and palettes use Pillow's
    ``convert("RGB")``. Multi-frame files give their first frame. Raises DatasetError when the file
    cannot be decoded (the original error is its ``__cause__``).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except _READ_ERRORS as err:
        raise DatasetError(f"cannot read image {path}: {err}; replace or remove the file") from err


def split_stratified(
    records: Sequence[ImageRecord], val_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]]:
    """Seeded per-class split into (train, val), each sorted by path.

    Each class puts ``round(n * val_fraction)`` images into validation, clamped so both splits keep
    at least one (a class of 2 splits 1/1). Records are sorted by path first, so the result depends
    only on the file list and the seed, not on filesystem order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} is outside (0, 1); use e.g. 0.2 for an 80/20 split")
    by_label: dict[int, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda item: (item.label, str(item.path))):
        by_label.setdefault(record.label, []).append(record)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(by_label):
        members = by_label[label]
        if len(members) < MIN_IMAGES_PER_CLASS:
            raise DatasetError(
                f"class {label} has {len(members)} image; a stratified split needs at least "
                f"{MIN_IMAGES_PER_CLASS} per class: add images"
            )
        num_val = min(max(int(round(len(members) * val_fraction)), 1), len(members) - 1)
        order = rng.permutation(len(members))
        val.extend(members[i] for i in order[:num_val])
        train.extend(members[i] for i in order[num_val:])
    return tuple(sorted(train, key=_path_key)), tuple(sorted(val, key=_path_key))


def _path_key(record: ImageRecord) -> str:
    return str(record.path)


def file_list_hash(records: Sequence[ImageRecord], root: str | os.PathLike) -> str:
    """sha256 over the sorted ``label/relative_path`` lines: identifies a split in the run manifest."""
    root = Path(root).expanduser()
    return sha256_text(sorted(f"{record.label}/{_relative(Path(record.path), root)}" for record in records))


def check_crop(crop: float) -> float:
    """A centre-crop fraction in [MIN_CROP, 1]; anything else is a user error."""
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not MIN_CROP <= crop <= 1.0:
        raise ConfigError(f"--crop {crop!r} must lie in [{MIN_CROP}, 1]: the share of the image kept, e.g. 0.875 "
                          "(1 keeps the whole image)")
    return float(crop)


def run_crop(run_info: dict) -> float:
    """The centre-crop fraction a run was trained with (runs made before the option: 1, the whole image)."""
    return float(run_info.get("crop", 1.0))


def resize_image(image: Image.Image, img_size: int, crop: float = 1.0) -> Image.Image:
    """Squash the image to a square, bilinear; by default the whole image (defects may sit at the border).

    With ``crop`` < 1 the square is ``round(img_size / crop)`` pixels and its centre ``img_size`` pixels
    are kept: the border, where fixtures and background vary from shot to shot, is dropped.
    """
    if not isinstance(img_size, int) or img_size <= 0:
        raise ConfigError(f"image size {img_size!r} is not a positive integer; use e.g. 224")
    squashed = img_size if check_crop(crop) == 1.0 else round(img_size / crop)
    if image.size != (squashed, squashed):
        image = image.resize((squashed, squashed), RESAMPLE)
    if squashed == img_size:
        return image
    offset = (squashed - img_size) // 2
    return image.crop((offset, offset, offset + img_size, offset + img_size))


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> float32 (3, H, W): scaled to [0, 1], then (x - mean) / std per channel."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(image: Image.Image, img_size: int, mean: Sequence[float], std: Sequence[float],
               crop: float = 1.0) -> np.ndarray:
    """The inference transform: resize (squash, centre-crop ``crop``) to img_size, scale to [0, 1],
    normalise -> (3, H, W)."""
    return normalize(resize_image(image, img_size, crop), mean, std)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Industrial-image augmentation: flips, 90-degree rotations, brightness and contrast within +-12%.

    Apply after :func:`resize_image`: rotations by 90/270 degrees are drawn only for square images
    (others get 0 or 180). The same number of draws is made every call, so a seed fixes the stream.
    """
    flip_h, flip_v = rng.random(2) < 0.5
    quarter_turns = int(rng.integers(4))
    brightness, contrast = rng.uniform(0.88, 1.12, size=2)
    if image.width != image.height:
        quarter_turns -= quarter_turns % 2
    if flip_h:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_v:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if quarter_turns:
        image = image.transpose(_ROTATIONS[quarter_turns])
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    array = (array - array.mean()) * contrast + array.mean()
    array = np.clip(np.rint(array * brightness), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def load_tensor_batch(
    records: Sequence[ImageRecord],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rng: np.random.Generator | None = None,
    crop: float = 1.0,
) -> np.ndarray:
    """Float32 (N, 3, img_size, img_size): load, resize (and centre-crop) once, augment if ``rng`` is given,
    normalise."""
    batch = np.empty((len(records), 3, img_size, img_size), dtype=np.float32)
    for index, record in enumerate(records):
        image = resize_image(load_image(record.path), img_size, crop)
        if rng is not None:
            image = augment(image, rng)
        batch[index] = normalize(image, mean, std)
    return batch


def class_weights(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Inverse-frequency loss weights, float32, mean 1 over the classes present (absent classes: 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights /= weights[present].mean()
    return weights.astype(np.float32)

