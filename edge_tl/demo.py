"""`edge-tl demo`: the pipeline on a generated surface-defect dataset, on any machine, offline."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from edge_tl.finetune import FinetuneConfig, FinetuneResult, finetune
from edge_tl.synthetic import make_surface_dataset

DEMO_CONFIG = FinetuneConfig(backbone="efficientnet_lite0", img_size=128, epochs=30, ok_class="ok", seed=0)


def run_demo(out: str | Path, cfg: FinetuneConfig = DEMO_CONFIG) -> FinetuneResult:
    """Generate the embedded dataset under OUT/data and fine-tune into OUT/run (both replaced)."""
    started = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    make_surface_dataset(data_dir, seed=cfg.seed)
    result = finetune(data_dir, out / "run", cfg, force=True)
    result.seconds_total = time.perf_counter() - started
    return result
