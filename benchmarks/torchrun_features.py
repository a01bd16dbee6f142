"""Issue 20: the frozen-trunk feature pass with one process and with torchrun, wall time and agreement.

python benchmarks/torchrun_features.py [DATA_DIR] [--out RESULT.json] [--work DIR] [--runs NAME ...]

``cache_features`` of the default backbone at its default input size, with the default augmented
views, over every image of DATA_DIR (default ../shared/datasets/magnetic-tile), run three ways on
the CPU: one process with every core's thread, one process with one thread, and ``torchrun
--standalone --nproc-per-node 2`` with one thread per rank. Each run reports the pass itself (from
the model built to every rank holding the gathered cache) and the whole command (process start,
imports, model load); rank 0 saves the cache, and the result gives the largest difference between
the torchrun cache and the one-process cache.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import dataset_dir, report

REPO = Path(__file__).resolve().parents[1]
RUNS = {"one_process_all_threads": (1, None), "one_process_one_thread": (1, 1), "torchrun_2_ranks_one_thread": (2, 1)}


def worker(data_dir: Path, out: Path) -> None:
    """One run of the pass (under torchrun: one rank of it); rank 0 writes OUT.safetensors and OUT.json."""
    import torch
    import torch.distributed as dist

    from edge_tl.artifacts import atomic_write_json, save_weights
    from edge_tl.backbones import build_model, get_backbone
    from edge_tl.data import scan_image_folder
    from edge_tl.device import CPU
    from edge_tl.distributed import is_active, is_main_process, process_group
    from edge_tl.features import cache_features
    from edge_tl.finetune_config import FinetuneConfig

    cfg = FinetuneConfig()
    with process_group(CPU) as (rank, world):
        spec = get_backbone(cfg.backbone)
        records = sorted(scan_image_folder(data_dir).records, key=lambda record: str(record.path))
        model = build_model(spec, num_classes=2, img_size=cfg.resolved_img_size(spec), pretrained=True).eval()
        if is_active():
            dist.barrier()
        started = time.perf_counter()
        features = cache_features(model.trunk, records, cfg.resolved_img_size(spec), spec, cfg.augmented_views,
                                  cfg.seed, device=CPU, crop=cfg.crop, runtime=cfg.trunk_runtime)
        seconds = time.perf_counter() - started
    if is_main_process():
        save_weights(out.with_suffix(".safetensors"), {"features": features})
        atomic_write_json(out.with_suffix(".json"), {
            "images": len(records), "views_per_image": cfg.augmented_views + 1, "world_size": world,
            "torch_threads_per_process": torch.get_num_threads(), "backbone": spec.name,
            "img_size": cfg.resolved_img_size(spec), "trunk_runtime": cfg.trunk_runtime,
            "features_shape": list(features.shape), "pass_seconds": seconds})


def run(name: str, data_dir: Path, work: Path) -> dict:
    processes, threads = RUNS[name]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc-per-node", str(processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([*launcher, __file__, "--worker", str(data_dir), "--out", str(work / name)], env=env, check=True,
                   cwd=work)
    command_seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads((work / f"{name}.json").read_text())
    images = result["images"]
    # cores the command kept busy on average: well below processes x threads means it waited for the CPU
    return {**result, "command_seconds": command_seconds, "command_cpu_seconds": cpu_seconds,
            "command_cores_busy": cpu_seconds / command_seconds,
            "pass_images_per_second": images / result["pass_seconds"],
            "pass_views_per_second": images * result["views_per_image"] / result["pass_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path, nargs="?", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="Folder for the caches (default: a temporary one).")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="Which runs (default all); with --work, runs already there are reused for the differences.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.data_dir, args.out)
        return
    from safetensors.torch import load_file

    data_dir = args.data_dir or dataset_dir("magnetic-tile")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        runs = {name: run(name, data_dir, work) for name in args.runs}
        caches = {name: load_file(work / f"{name}.safetensors")["features"].float() for name in RUNS
                  if (work / f"{name}.safetensors").is_file()}
    out = {"command": "python benchmarks/torchrun_features.py " + str(data_dir), "data_dir": str(data_dir),
           "cores": os.cpu_count(), "runs": runs,
           "max_abs_difference": {f"{a} vs {b}": float((caches[a] - caches[b]).abs().max())
                                  for a, b in itertools.combinations(caches, 2)},
           "feature_scale_max_abs": max(float(cache.abs().max()) for cache in caches.values())}
    report("torchrun_features", out, args.out)


if __name__ == "__main__":
    main()
