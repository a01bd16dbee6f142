"""`edge-tl demo`: the pipeline on a generated surface-defect dataset, on any machine, offline.

Generate the embedded dataset, fine-tune, prune with recovery, quantize (PTQ), export ONNX FP32 and
INT8 for both stages, and verify every export against its float model.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_tl.finetune import FinetuneConfig, FinetuneResult, finetune
from edge_tl.synthetic import make_surface_dataset

DEMO_CONFIG = FinetuneConfig(backbone="efficientnet_lite0", img_size=128, epochs=30, ok_class="ok", seed=0)


@dataclass
class DemoResult:
    run_dir: Path
    finetune: FinetuneResult
    metrics: dict
    stages: dict = field(default_factory=dict)
    verification: list = field(default_factory=list)
    seconds_total: float = 0.0


def run_demo(out: str | Path, cfg: FinetuneConfig = DEMO_CONFIG, images_per_class=None,
             recover_epochs: int = 2, calib_images: int = 64) -> DemoResult:
    """Generate the embedded dataset under OUT/data and run the chain into OUT/run (both replaced)."""
    from edge_tl.prune_stage import PruneConfig, prune_run
    from edge_tl.quantize import QuantizeConfig, quantize
    from edge_tl.verify import verify
    from export.stage import ExportConfig, export_artifact

    started = time.perf_counter()
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    make_surface_dataset(data_dir, images_per_class, seed=cfg.seed)
    tuned = finetune(data_dir, run_dir, cfg, force=True)
    result = DemoResult(run_dir, tuned, tuned.metrics)
    result.stages["pruned"] = prune_run(run_dir, PruneConfig(recover_epochs=recover_epochs, seed=cfg.seed,
                                                             latency_runs=20)).metrics
    for stage in ("float", "pruned"):
        quantized = quantize(run_dir, QuantizeConfig(stage=stage, calib_images=calib_images, seed=cfg.seed))
        result.stages[f"quantized/{stage}"] = quantized.metrics
        for precision in ("fp32", "int8"):
            manifest = export_artifact(run_dir, ExportConfig(precision=precision, stage=stage))
            result.verification.append(verify(run_dir, manifest["path"], max_drop=1.0, max_escape_rise=0.0))
    result.seconds_total = time.perf_counter() - started
    return result
