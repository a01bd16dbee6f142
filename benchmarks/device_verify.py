"""Device-side verification against the workstation's, on a finished run (issue 16).

python benchmarks/device_verify.py RUN_DIR [--out FILE.json]

For every ONNX artifact in RUN_DIR/export: the workstation verify (float PyTorch model and the
run directory) and the device verify (`edge-tl verify ARTIFACT --pack PACK --data DIR` in a Python
where torch, timm and NNI cannot be imported, scripts/device_python, on a copy holding only the
artifact, its pack and the validation images). Prints both records' agreement, deltas and verdict,
whether they are equal, both wall times, and the pack's size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import report

from edge_tl.artifacts import read_json
from edge_tl.verify import verify
from edge_tl.verify_pack import pack_path, read_pack

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("num_samples", "top1_agreement", "balanced_accuracy_delta", "escape_rate_delta", "flips", "passed")


def device_record(artifact: Path, run_dir: Path, work: Path) -> tuple[dict, float]:
    """(the device verify's record, its wall seconds) from a folder holding only what a device gets."""
    run_info = read_json(run_dir / "run.json")
    stage = read_json(f"{artifact}.json")["stage"]
    device = work / artifact.stem
    images = device / "images"
    for rel in run_info["split"]["val_files"]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(run_info["data_dir"]) / rel, images / rel)
    for name in (artifact.name, f"{artifact.name}.json", f"verify-pack.{stage}.json"):
        shutil.copy2(run_dir / "export" / name, device / name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "scripts" / "device_python"), str(ROOT)]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edge_tl", "verify", str(device / artifact.name), "--pack",
                           str(device / f"verify-pack.{stage}.json"), "--data", str(images), "--out",
                           str(device / "record.json")], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"device verify of {artifact.name} failed: {done.stderr.strip()}")
    return read_json(device / "record.json"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for artifact in sorted((args.run_dir / "export").glob("*.onnx")):
            pack = read_pack(pack_path(args.run_dir, read_json(f"{artifact}.json")["stage"]))
            start = time.perf_counter()  # the workstation verify with the gate the pack carries
            workstation = verify(args.run_dir, artifact, max_drop=pack.max_drop, max_escape_rise=pack.max_escape_rise)
            workstation_s = time.perf_counter() - start
            device, device_s = device_record(artifact, args.run_dir, Path(work))
            rows.append({
                "artifact": artifact.name, "equal": all(device[k] == workstation[k] for k in COMPARED),
                "workstation": {k: workstation[k] for k in COMPARED}, "device": {k: device[k] for k in COMPARED},
                "workstation_seconds": round(workstation_s, 2), "device_seconds": round(device_s, 2),
            })
    packs = {path.name: path.stat().st_size for path in (args.run_dir / "export").glob("verify-pack.*.json")}
    report("device_verify", {"run_dir": str(args.run_dir), "pack_size_bytes": packs, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
