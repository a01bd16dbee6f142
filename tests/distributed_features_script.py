"""In-order gathers, the frozen-prefix cache and a trained tail on a small image folder, for one process or under torchrun.

``python tests/distributed_features_script.py DATA_DIR OUT.safetensors`` (under ``torchrun
--nproc-per-node 2`` too): uneven per-rank parts gathered in order (:func:`gather_part`), the
cached activations entering the last trunk block (the plain view and two augmented views of every
image, sharded and gathered across ranks), then that block and the head trained on them
(DistributedDataParallel under torchrun); rank 0 saves everything with safetensors.
tests/test_distributed.py compares the torchrun run with :func:`compute` in one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from edge_tl.artifacts import save_weights
from edge_tl.backbones import build_model, get_backbone
from edge_tl.data import scan_image_folder
from edge_tl.device import CPU
from edge_tl.distributed import gather_in_order, group_rank, is_main_process, process_group
from edge_tl.features import cache_features
from edge_tl.finetune_config import FinetuneConfig
from edge_tl.tail import TrainableTail, freeze_trunk, frozen_prefix, train_tail

IMG = 64
VIEWS = 2
SEED = 5
PASS_BATCH = 10  # 48 images: 5 batches, 3 for rank 0 and 2 (the last one short) for rank 1
# 4 images per step over 21 fit images: the last minibatch holds one image, so rank 1's share of it is empty
CFG = FinetuneConfig(img_size=IMG, epochs=2, augmented_views=VIEWS, unfreeze=1, seed=SEED, batch_size=4,
                     patience=5, trunk_runtime="torch")
FIT = 21
# (dtype, gather dim, rows of rank 0, rows of rank 1; None: an empty shard): uneven, and dtypes gloo refuses
GATHER_CASES = {"float16": (torch.float16, 1, 3, 5), "int16": (torch.int16, 0, 4, 1),
                "bool_empty_rank": (torch.bool, -1, 2, None), "float32_empty_first": (torch.float32, 0, None, 3)}


def gather_part(case: str, rank: int) -> torch.Tensor | None:
    """Rank ``rank``'s part for ``case``: values that name the rank and the position."""
    dtype, dim, *rows = GATHER_CASES[case]
    if rows[rank] is None:
        return None
    shape = [2, 3, 2]
    shape[dim] = rows[rank]
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) + 100 * rank
    return (values % 2 == 1) if dtype == torch.bool else values.to(dtype)


def compute(data_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """{"features": (views + 1, N, C, H, W) float16 cache, "tail.<name>": trained tail weights}, tail history.
    The tail's early stopping watches the fit images themselves, so its history shows every trained epoch."""
    scan = scan_image_folder(data_dir)
    records = sorted(scan.records, key=lambda record: str(record.path))
    spec = get_backbone(CFG.backbone)
    torch.manual_seed(SEED)  # the new head's initial weights, as finetune seeds them
    model = build_model(spec, num_classes=len(scan.classes), img_size=IMG, pretrained=True).eval()
    features = cache_features(frozen_prefix(model, CFG.unfreeze), records, IMG, spec, VIEWS, SEED,
                              batch_size=PASS_BATCH, runtime="torch")
    freeze_trunk(model, CFG.unfreeze)
    labels = np.array([record.label for record in records])
    tail = TrainableTail(model, CFG.unfreeze)
    fitted = train_tail(tail, features, labels, np.arange(FIT), np.arange(FIT), scan.classes, CFG, CPU)
    tensors = {"features": features, **{f"tail.{name}": value for name, value in tail.state_dict().items()}}
    return tensors, fitted.history


def main(argv: list[str]) -> int:
    data_dir, out = Path(argv[0]), Path(argv[1])
    with process_group(CPU):
        rank, _ = group_rank()
        gathered = {f"gather.{case}": gather_in_order(gather_part(case, rank), GATHER_CASES[case][1])
                    for case in GATHER_CASES}
        tensors, history = compute(data_dir)
    if is_main_process():
        save_weights(out, {**gathered, **tensors}, {"history": json.dumps(history)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
