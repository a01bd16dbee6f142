"""Issue 3 targets on magnetic-tile: balanced accuracy, escape rate, wall time, cache speed-up.

python benchmarks/finetune_magnetic_tile.py --out /tmp/mt-run [--unfreeze K]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import dataset_dir, report

from edge_tl.finetune import FinetuneConfig, finetune


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--unfreeze", type=int, default=None)
    parser.add_argument("--skip-uncached", action="store_true")
    args = parser.parse_args()
    data = dataset_dir("magnetic-tile")
    overrides = {"ok_class": "free"}
    if args.unfreeze is not None:
        overrides["unfreeze"] = args.unfreeze
    cfg = FinetuneConfig(**overrides)
    started = time.perf_counter()
    result = finetune(data, args.out, cfg, force=True)
    wall = time.perf_counter() - started
    out = {
        "command": "edge-tl finetune ../shared/datasets/magnetic-tile --out RUN --ok-class free",
        "config": cfg.__dict__,
        "balanced_accuracy": result.metrics["balanced_accuracy"],
        "accuracy": result.metrics["accuracy"],
        "escape_rate": result.metrics["escape_rate"],
        "false_reject_rate": result.metrics["false_reject_rate"],
        "confusion_matrix": result.metrics["confusion_matrix"],
        "epochs_run": len(result.history),
        "wall_seconds": wall,
        "cached_seconds_per_epoch": result.seconds_per_epoch,
    }
    if not args.skip_uncached:
        # One uncached epoch: the trunk runs on every image with fresh augmentation.
        uncached_cfg = FinetuneConfig(**{**cfg.__dict__, "cache_features": False, "epochs": 1})
        uncached = finetune(data, args.out.with_name(args.out.name + "-uncached"), uncached_cfg, force=True)
        out["uncached_seconds_per_epoch"] = uncached.seconds_per_epoch
        out["cache_speedup_per_epoch"] = uncached.seconds_per_epoch / result.seconds_per_epoch
    report("finetune_magnetic_tile", out, args.out.parent / f"{args.out.name}-bench.json")


if __name__ == "__main__":
    main()
