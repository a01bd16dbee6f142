"""A fine-tuned run's checkpoint and splits, as every later stage reads them.

Below fine-tuning and the compression stages alike: ``prune``, ``quantize``, ``export``, ``verify``
and ``bench`` rebuild the model and the split records from the run directory ``finetune`` wrote.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from edge_tl import data as data_mod
from edge_tl.artifacts import load_weights, read_json
from edge_tl.backbones import build_model, get_backbone
from edge_tl.errors import ArtifactError, DatasetError


def load_checkpoint(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the fine-tuned model of a run directory from run.json and model.safetensors."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} does not exist; run `edge-tl finetune DATA_DIR --out {run_dir}` first")
    run_info = read_json(run_dir / "run.json")
    spec = get_backbone(run_info["backbone"])
    model = build_model(spec, num_classes=len(run_info["classes"]), img_size=run_info["img_size"], pretrained=False)
    model.load_state_dict(load_weights(run_dir / "model.safetensors"), strict=True)
    model.eval()
    return model, run_info


def run_records(run_info: dict, split: str = "val") -> list:
    """The records of a run's train or validation split, resolved against its data directory."""
    root = Path(run_info["data_dir"])
    classes = run_info["classes"]
    records = []
    for rel in run_info["split"][f"{split}_files"]:
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"{path} from the run's {split} split is missing; pass --data DIR with the same classes")
        records.append(data_mod.ImageRecord(path, classes.index(Path(rel).parts[0])))
    return records
