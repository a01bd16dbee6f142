"""`edge-tl demo`: the whole `edge-tl run` chain on a generated surface-defect dataset, offline.

Generate the embedded dataset (procedural surfaces with scratches, spots and cracks), then run the
chain with :data:`DEMO_RECIPE`: fine-tune at 128 px, prune with a short recovery, quantize (PTQ)
both stages, export ONNX FP32/FP16/INT8 (and engines where TensorRT exists), verify every export,
bench, report.

The demo folder holds a marker file; a folder that is neither new, empty nor marked is refused, so
``--out`` pointed at a user's own folder never deletes its ``data`` or ``run``.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edge_tl.artifacts import atomic_write_text
from edge_tl.errors import ArtifactError
from edge_tl.pipeline import PipelineResult, run_pipeline
from edge_tl.recipe import recipe_from_dict
from edge_tl.synthetic import make_surface_dataset

DEMO_RECIPE = MappingProxyType({
    "finetune": {"img_size": 128, "ok_class": "ok"},
    "prune": {"recover_epochs": 2, "latency_runs": 20},
    "quantize": {"calib_images": 64},
    "bench": {"batch_sizes": [1], "min_time_s": 0.5},
})


MARKER = ".edge-tl-demo"


def check_demo_dir(out: str | Path) -> Path:
    """OUT must be new, empty, or a folder an earlier demo made (it has the marker file)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file, not a directory; choose a new folder for the demo")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ArtifactError(f"--out {out} is not empty and was not made by edge-tl demo; choose a new or empty folder")
    return out


def run_demo(out: str | Path, recipe: Mapping[str, Any] = DEMO_RECIPE, images_per_class=None) -> PipelineResult:
    """Generate the dataset under OUT/data and run the chain into OUT/run (both replaced)."""
    out = check_demo_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, "edge-tl demo folder: data/ and run/ are replaced on each run\n")
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    make_surface_dataset(data_dir, images_per_class, seed=0)
    return run_pipeline(data_dir, out / "run", recipe_from_dict(dict(recipe), "demo recipe"), force=True)
