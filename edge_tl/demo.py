"""`edge-tl demo`: the whole `edge-tl run` chain on a generated surface-defect dataset, offline.

Generate the embedded dataset (procedural surfaces with scratches, spots and cracks), then run the
chain with :data:`DEMO_RECIPE`: fine-tune at 128 px, prune with a short recovery, quantize (PTQ)
both stages, export ONNX FP32/FP16/INT8 (and engines where TensorRT exists), verify every export,
bench, report.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from edge_tl.pipeline import PipelineResult, run_pipeline
from edge_tl.recipe import recipe_from_dict
from edge_tl.synthetic import make_surface_dataset

DEMO_RECIPE = MappingProxyType({
    "finetune": {"img_size": 128, "ok_class": "ok"},
    "prune": {"recover_epochs": 2, "latency_runs": 20},
    "quantize": {"calib_images": 64},
    "bench": {"batch_sizes": [1], "min_time_s": 0.5},
})


def run_demo(out: str | Path, recipe: Mapping[str, Any] = DEMO_RECIPE, images_per_class=None) -> PipelineResult:
    """Generate the dataset under OUT/data and run the chain into OUT/run (both replaced)."""
    out = Path(out)
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    make_surface_dataset(data_dir, images_per_class, seed=0)
    return run_pipeline(data_dir, out / "run", recipe_from_dict(dict(recipe), "demo recipe"), force=True)
