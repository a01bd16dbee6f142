"""Shared helpers for the benchmark scripts: where the real data lives, how to print a result."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def dataset_dir(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        sys.exit(f"benchmark data {path} is absent; it lives in ../shared/datasets beside the checkout")
    return path


def machine() -> dict:
    import os

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def report(name: str, result: dict, out: Path | None) -> None:
    text = json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
