"""The embedded demo dataset: procedural metal-surface images with scratches, spots and cracks.

Every image is a textured surface (grain noise, brushed-metal streaks at a random angle, mottling,
uneven lighting and a faint colour cast); defect classes get one kind of defect drawn on top with a
random size, position and contrast, some of them faint. Numpy and Pillow only, deterministic for a
seed: image ``i`` of class ``c`` depends only on (seed, class kind, i), so changing one class's count
leaves the other classes' images unchanged.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edge_tl.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CLASSES = ("ok", "scratch", "spot", "crack")
# A factory set's scale: a few hundred good parts, fewer of each defect. The validation split
# (20%) then holds 26-30 images of each defect, so one image moves balanced accuracy by < 1 point,
# the release gate's width (with 10 cracks, as at 50, one image moved it 2.5 points).
DEMO_IMAGES_PER_CLASS = MappingProxyType({"ok": 400, "scratch": 150, "spot": 150, "crack": 130})
_REFERENCE_SIZE = 96.0


def _upsampled_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise: a cells x cells Gaussian grid resized bilinearly to size x size, unit std."""
    grid = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _brushed_streaks(rng: np.random.Generator, size: int) -> np.ndarray:
    """Long thin parallel streaks at a random angle, unit-ish amplitude."""
    canvas = int(np.ceil(size * 1.5))
    rows = rng.normal(size=(canvas, 1)).astype(np.float32)
    along = _upsampled_noise(rng, canvas, 4) * 0.3 + 1.0
    streaks = Image.fromarray(rows * along).rotate(float(rng.uniform(0, 180)), Image.Resampling.BILINEAR)
    offset = (canvas - size) // 2
    return np.asarray(streaks, dtype=np.float32)[offset : offset + size, offset : offset + size]


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Defect-free surface texture, float32 gray levels around 90-170."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(-0.5, 0.5, size=2)
    lighting = (
        rng.uniform(-25, 25) * (x * np.cos(angle) + y * np.sin(angle))
        - rng.uniform(0, 30) * ((x - cx) ** 2 + (y - cy) ** 2)
    )
    return (
        rng.uniform(95, 165)
        + lighting
        + rng.uniform(2, 7) * _upsampled_noise(rng, size, max(4, size // 12))
        + rng.uniform(2, 8) * _brushed_streaks(rng, size)
        + rng.uniform(3, 8) * rng.normal(size=(size, size)).astype(np.float32)
    )


def _mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None], blur: float) -> np.ndarray:
    """Render shapes into a [0, 1] float mask, softened by a small blur."""
    image = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(image))
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image, dtype=np.float32) / 255.0


def _scratch(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """One or two thin straight-ish lines, bright or dark, random angle; signed intensity change."""
    def draw(canvas: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(1, 3))):
            length = rng.uniform(0.25, 0.7) * size
            angle = rng.uniform(0, np.pi)
            cx, cy = rng.uniform(0.15, 0.85, size=2) * size
            dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
            bend = rng.normal(0, 0.04 * length, size=2)
            points = [(cx - dx, cy - dy), (cx + bend[0], cy + bend[1]), (cx + dx, cy + dy)]
            canvas.line(points, fill=255, width=max(1, int(round(scale * rng.choice([1, 1, 2])))))

    sign = 1.0 if rng.random() < 0.6 else -1.0
    return sign * rng.uniform(16, 45) * _mask(size, draw, blur=0.5 * scale)


def _spot(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """One to three soft round blobs, mostly dark; signed intensity change."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    total = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(2.0, 6.5) * scale
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        squash = rng.uniform(0.6, 1.0)
        distance2 = ((x - cx) ** 2 + ((y - cy) / squash) ** 2) / radius**2
        total = np.maximum(total, np.exp(-distance2 ** 1.5))
    sign = -1.0 if rng.random() < 0.7 else 1.0
    return sign * rng.uniform(22, 60) * total


def _crack(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A jagged dark random-walk polyline, sometimes with a branch; negative intensity change."""
    def walk(start: np.ndarray, heading: float, steps: int) -> list[tuple[float, float]]:
        points, position, drift = [tuple(start)], start.copy(), 0.0
        for _ in range(steps):
            drift += rng.normal(0, 0.15)
            step = heading + drift + rng.normal(0, 0.7)
            position = position + rng.uniform(1.5, 3.0) * scale * np.array([np.cos(step), np.sin(step)])
            points.append((float(position[0]), float(position[1])))
        return points

    def draw(canvas: ImageDraw.ImageDraw) -> None:
        trunk = walk(rng.uniform(0.15, 0.85, size=2) * size, rng.uniform(0, 2 * np.pi), int(rng.integers(14, 32)))
        canvas.line(trunk, fill=255, width=max(1, int(round(scale))))
        if rng.random() < 0.4:
            fork = np.array(trunk[int(rng.integers(len(trunk)))])
            canvas.line(walk(fork, rng.uniform(0, 2 * np.pi), int(rng.integers(4, 12))), fill=255, width=1)

    return -rng.uniform(35, 75) * _mask(size, draw, blur=0.4 * scale)


_DEFECTS = MappingProxyType({"ok": None, "scratch": _scratch, "spot": _spot, "crack": _crack})


def make_surface_image(kind: str, img_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB surface image of the given kind ('ok', 'scratch', 'spot' or 'crack')."""
    if kind not in _DEFECTS:
        raise ConfigError(f"unknown surface class {kind!r}; valid classes are {', '.join(_DEFECTS)}")
    scale = img_size / _REFERENCE_SIZE
    gray = _surface(rng, img_size)
    tint = rng.uniform(0.97, 1.03, size=3).astype(np.float32)
    defect = _DEFECTS[kind]
    if defect is not None:
        gray = gray + defect(rng, img_size, scale)
    rgb = np.clip(np.rint(gray[:, :, None] * tint), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _counts(images_per_class: Mapping[str, int] | int | None, classes: Sequence[str]) -> dict[str, int]:
    if images_per_class is None:
        counts = {name: DEMO_IMAGES_PER_CLASS.get(name, 0) for name in classes}
    elif isinstance(images_per_class, int):
        counts = {name: images_per_class for name in classes}
    else:
        counts = dict(images_per_class)
    for name, count in counts.items():
        if name not in _DEFECTS:
            raise ConfigError(f"unknown surface class {name!r}; valid classes are {', '.join(_DEFECTS)}")
        if not isinstance(count, int) or count < 0:
            raise ConfigError(f"image count {count!r} for class {name!r} is not a non-negative integer")
    return counts


def make_surface_dataset(
    root: str | os.PathLike,
    images_per_class: Mapping[str, int] | int | None = None,
    img_size: int = 96,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Path:
    """Write ``root/<class>/<class>_<i>.png`` and return ``root``.

    ``images_per_class`` is a {class: count} mapping (its keys are the classes), one count for every
    name in ``classes``, or None for the demo's imbalanced default (ok 400, scratch 150, spot 150,
    crack 130). ``root`` must not exist or be empty; the folder appears complete or not at all.
    """
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ArtifactError(f"dataset folder {root} already exists and is not empty; choose a new folder or remove it")
    if not isinstance(img_size, int) or img_size < 16:
        raise ConfigError(f"image size {img_size!r} is too small for the surface dataset; use 16 or more, e.g. 96")
    counts = _counts(images_per_class, classes)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for name, count in counts.items():
            (staging / name).mkdir()
            kind_index = list(_DEFECTS).index(name)
            for index in range(count):
                rng = np.random.default_rng([seed, kind_index, index])
                image = make_surface_image(name, img_size, rng)
                image.save(staging / name / f"{name}_{index}.png", compress_level=1)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d surface images (%s) to %s", sum(counts.values()), counts, root)
    return root
