"""`edge-tl sweep` of four trials on the demo set with 1 and 2 Ray workers: wall time and overhead per trial.

    python benchmarks/sweep_demo.py --out /tmp/sweep_demo

The trials (benchmarks/sweep_demo.yaml): image size 96/128 x augmented views 0/2, unpruned, FP32 and
INT8 exports. Overhead per trial: with one worker the trials run one after the other, so the sweep's
wall time minus the sum of the trials' own seconds is what Ray (start, scheduling, result transport)
adds; with two workers, wall time against the one-worker sweep is the speed-up.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import report

from edge_tl.synthetic import make_surface_dataset
from edge_tl.sweep import sweep

GRID = Path(__file__).with_name("sweep_demo.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    data = args.out / "data"
    if not data.is_dir():
        make_surface_dataset(data, None, seed=0)
    results = {}
    for workers in (int(w) for w in args.workers.split(",")):
        out = args.out / f"workers-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        record = sweep(data, GRID, out, scheduler="ray", workers=workers)
        wall = time.perf_counter() - started
        trial_seconds = [row.get("seconds") or 0.0 for row in record["rows"]]
        results[f"workers_{workers}"] = {
            "wall_s": round(wall, 1), "trial_seconds": trial_seconds, "sum_trial_s": round(sum(trial_seconds), 1),
            "overhead_per_trial_s": round((wall - sum(trial_seconds) / workers) / len(trial_seconds), 2),
            "rows": [{key: row.get(key) for key in ("name", "status", "artifact", "latency_ms_p50",
                                                    "balanced_accuracy", "verdict", "error")}
                     for row in record["rows"]], "best": record["best"]}
    report("sweep_demo", results, args.out / "sweep_demo.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
