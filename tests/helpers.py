"""Run-directory writers that several test modules share: a PTQ calibration file and a slim pruned stage."""
from __future__ import annotations

from calibrate.calibration_file import write_calibration
from calibrate.observe import collect_calibration
from calibrate.sources import ClassBalancedSource
from edge_tl.artifacts import atomic_write_json, save_weights
from edge_tl.finetune import load_checkpoint, run_records
from edge_tl.fold import fold_batchnorm
from edge_tl.prune_stage import load_pruned


def write_ptq_calibration(run_dir, model=None, mode: str = "ptq"):
    """calibration.json of the run's BN-folded float model (or ``model``, already folded) over its training split."""
    stage_model, run_info = load_checkpoint(run_dir)
    folded = model if model is not None else fold_batchnorm(stage_model)
    size = run_info["img_size"]
    source = ClassBalancedSource(run_records(run_info, "train"), 64, size, run_info["mean"], run_info["std"],
                                 batch_size=16, min_images=1)
    calibration = collect_calibration(folded, source, model_info={"stage": "float", "img_size": size, "mode": mode},
                                      calibration_files_hash=source.file_list_hash(run_info["data_dir"]))
    path = run_dir / "quantized" / "float" / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_calibration(path, calibration)
    return calibration


def write_slim_pruned(run, block: int = 2, keep: int = 48):
    """RUN_DIR/pruned as the prune stage writes it: one block's expansion channels cut to ``keep``."""
    model, _ = load_checkpoint(run)
    state = dict(model.state_dict())
    body = f"trunk.blocks.{block}.body"
    for layer in (0, 1, 3, 4):
        for key in [k for k in state if k.startswith(f"{body}.{layer}.") and state[k].dim() > 0]:
            state[key] = state[key][:keep].clone()
    state[f"{body}.6.weight"] = state[f"{body}.6.weight"][:, :keep].clone()
    expand = model.get_submodule(f"{body}.0")
    layers = {
        f"{body}.0": {"type": "Conv2d", "in_channels": expand.in_channels, "out_channels": keep, "groups": 1},
        f"{body}.1": {"type": "BatchNorm2d", "num_features": keep},
        f"{body}.3": {"type": "Conv2d", "in_channels": keep, "out_channels": keep, "groups": keep},
        f"{body}.4": {"type": "BatchNorm2d", "num_features": keep},
        f"{body}.6": {"type": "Conv2d", "in_channels": keep, "out_channels": model.get_submodule(f"{body}.6").out_channels,
                      "groups": 1},
    }
    save_weights(run / "pruned" / "model.safetensors", state, {"stage": "pruned"})
    atomic_write_json(run / "pruned" / "shape.json", {"format": "edge-tl-shape-spec/1", "layers": layers})
    return load_pruned(run)[0]
