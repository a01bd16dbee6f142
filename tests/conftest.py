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

# The slowest files, slowest first (`--durations=0` on 2 workers, seconds of test time per file: 100, 66, 61,
# 56, 46, 45, 41, 40, 35, 32, 28; the rest take under 20 each). pytest.ini hands whole files to the
# xdist workers in collection order, so the long ones start first and the short ones fill the gaps.
SLOW_FILES_FIRST = ("test_distributed.py", "test_prune.py", "test_pipeline.py", "test_demo.py", "test_prune_stage.py",
                    "test_quantize.py", "test_device_side.py", "test_sweep.py", "test_export_stage.py",
                    "test_finetune.py", "test_verify.py")

MAGNETIC_TILE_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"
SURFACE_CLASSES = ("ok", "scratch", "spot", "crack")
SURFACE_IMAGES_PER_CLASS = 12
SURFACE_IMG_SIZE = 64


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


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
