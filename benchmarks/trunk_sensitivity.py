"""Why training the trunk fails on a dataset: how far the pretrained trunk sits from its ImageNet regime.

python benchmarks/trunk_sensitivity.py RUN [--images 128] [--out FILE]

On a finished `edge-tl run` (or fine-tune) directory RUN:
1. The variance of every BatchNorm layer's input on training images, as a share of its frozen
   ImageNet running variance (median and percentiles over all channels): well below 1 means the
   trunk runs on weak activations and the head needs large weights to read them.
2. One AdamW step (the recovery optimizer) on one batch of training images, for each learning
   rate: the relative change of the pooled features and the validation balanced accuracy after it.
3. The fine-tuned model's validation balanced accuracy on flipped and rotated copies of the
   validation images (the training augmentations): the ones it reads much worse are off the line's
   distribution.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from _common import report
from PIL import Image

from edge_tl.data import load_image, load_tensor_batch, normalize, resize_image, run_crop
from edge_tl.finetune import load_checkpoint, run_records
from edge_tl.metrics import balanced_accuracy, confusion_matrix
from edge_tl.recovery import _train_with_frozen_batchnorm

LEARNING_RATES = (1e-4, 1e-5, 1e-6)
VIEWS = {"flip left-right": Image.Transpose.FLIP_LEFT_RIGHT,
         "flip top-bottom": Image.Transpose.FLIP_TOP_BOTTOM, "rotate 90": Image.Transpose.ROTATE_90,
         "rotate 180": Image.Transpose.ROTATE_180}


def _balanced(model, images: torch.Tensor, labels: np.ndarray, num_classes: int) -> float:
    with torch.inference_mode():
        predictions = torch.cat([model.eval()(chunk) for chunk in torch.split(images, 64)]).argmax(1).numpy()
    return round(float(balanced_accuracy(confusion_matrix(labels, predictions, num_classes))), 4)


def batchnorm_variance_ratio(model, images: torch.Tensor) -> dict:
    ratios = []

    def hook(module, inputs, _output):
        channels = inputs[0].transpose(0, 1).flatten(1)
        ratios.append((channels.var(1) / (module.running_var + module.eps)).numpy())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.inference_mode():
        model.eval()(images)
    for handle in handles:
        handle.remove()
    values = np.concatenate(ratios)
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (5, 50, 95)}


def one_step(model, x, y, lr: float, val_images, val_features, val_labels, num_classes: int) -> dict:
    """One AdamW step on a copy of ``model``; ``val_features`` are ``model``'s pooled validation features."""
    student = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    _train_with_frozen_batchnorm(student)
    loss = torch.nn.functional.cross_entropy(student(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.inference_mode():
        after = student.eval().trunk(val_images)
    change = ((after - val_features).norm(dim=1) / val_features.norm(dim=1)).mean()
    return {"lr": lr, "feature_change": round(float(change), 4),
            "balanced_accuracy": _balanced(student, val_images, val_labels, num_classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=128, help="training images for the BatchNorm statistics")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, info = load_checkpoint(args.run)
    size, mean, std, classes = info["img_size"], info["mean"], info["std"], info["classes"]
    train, val = run_records(info, "train"), run_records(info, "val")
    picked = [train[i] for i in np.random.default_rng(0).permutation(len(train))[: args.images]]
    train_images = torch.from_numpy(load_tensor_batch(picked, size, mean, std, crop=run_crop(info)))
    val_resized = [resize_image(load_image(r.path), size, run_crop(info)) for r in val]
    val_labels = np.array([r.label for r in val])
    val_images = torch.from_numpy(np.stack([normalize(image, mean, std) for image in val_resized]))
    batch_labels = torch.tensor([r.label for r in picked[:32]])
    views = {"plain": _balanced(model, val_images, val_labels, len(classes))}
    for name, transpose in VIEWS.items():
        tensor = torch.from_numpy(np.stack([normalize(image.transpose(transpose), mean, std) for image in val_resized]))
        views[name] = _balanced(model, tensor, val_labels, len(classes))
    with torch.inference_mode():
        val_features = model.eval().trunk(val_images)
    report("trunk_sensitivity", {
        "run": str(args.run),
        "batchnorm_input_variance_ratio": batchnorm_variance_ratio(model, train_images),
        "one_adamw_step": [one_step(model, train_images[:32], batch_labels, lr, val_images, val_features, val_labels,
                                    len(classes)) for lr in LEARNING_RATES],
        "validation_balanced_accuracy_by_view": views,
    }, args.out)


if __name__ == "__main__":
    main()
