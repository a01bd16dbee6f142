"""Shared fixtures: a small generated surface dataset, and the real magnetic-tile data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from edge_tl.synthetic import make_surface_dataset

# The suite runs on pytest-xdist workers (README: `-n 2`): the cores are shared out between them, so two
# workers on the 2-core CI machine each take one thread instead of fighting over two.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

MAGNETIC_TILE_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"
SURFACE_CLASSES = ("ok", "scratch", "spot", "crack")
SURFACE_IMAGES_PER_CLASS = 12
SURFACE_IMG_SIZE = 64


@pytest.fixture(scope="session")
def surface_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 12 generated 64 px surface images; shared by the session, so treat it as read-only."""
    root = tmp_path_factory.mktemp("surface") / "data"
    return make_surface_dataset(
        root, SURFACE_IMAGES_PER_CLASS, img_size=SURFACE_IMG_SIZE, seed=0, classes=SURFACE_CLASSES
    )


@pytest.fixture
def magnetic_tile_dir() -> Path:
    """The real magnetic-tile image folder beside the checkout; skips when it is absent."""
    if not MAGNETIC_TILE_DIR.is_dir():
        pytest.skip(f"real dataset not found at {MAGNETIC_TILE_DIR} (../shared/datasets beside the checkout)")
    return MAGNETIC_TILE_DIR


@pytest.fixture
def one_thread():
    """Single-threaded torch for tests that time or compare runtimes; restores the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
