"""Frozen-trunk passes over image records: the cached views fine-tuning trains on, and plain-view logits.

A frozen trunk is a fixed function, so fine-tuning (:mod:`edge_tl.finetune`) and cross-validation
(:mod:`edge_tl.crossval`) run it once per image view and keep its outputs; predictions use the plain
view, the preprocessing every stage shares.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from edge_tl import data as data_mod
from edge_tl.backbones import BackboneSpec
from edge_tl.device import CPU, placed
from edge_tl.progress import progress_bar


def batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def image_views(record, cfg_img_size: int, spec: BackboneSpec, views: int, rng: np.random.Generator,
                crop: float = 1.0) -> list[np.ndarray]:
    """Plain view first, then ``views`` augmented views of one image (resized and cropped once), each preprocessed."""
    image = data_mod.resize_image(data_mod.load_image(record.path), cfg_img_size, crop)
    out = [data_mod.preprocess(image, cfg_img_size, spec.mean, spec.std)]
    for _ in range(views):
        out.append(data_mod.preprocess(data_mod.augment(image, rng), cfg_img_size, spec.mean, spec.std))
    return out


@torch.inference_mode()
def cache_features(prefix: nn.Module, records, img_size: int, spec: BackboneSpec, views: int, seed: int,
                   batch_size: int = 32, description: str = "caching trunk features",
                   device: torch.device = CPU, crop: float = 1.0) -> torch.Tensor:
    """Run the frozen prefix over every record's views once, on ``device``: a CPU tensor (views + 1, N, ...)."""
    rng = np.random.default_rng(seed)
    per_view: list[list[torch.Tensor]] = [[] for _ in range(views + 1)]
    with progress_bar(description, total=len(records)) as advance, placed(prefix, device):
        for chunk in batched(list(records), batch_size):
            stacked = [image_views(record, img_size, spec, views, rng, crop) for record in chunk]
            for view in range(views + 1):
                batch = torch.from_numpy(np.stack([item[view] for item in stacked]))
                features = prefix(batch.to(device)).cpu()
                per_view[view].append(features.half() if features.dim() > 2 else features)
            advance(len(chunk))
    return torch.stack([torch.cat(parts) for parts in per_view])


@torch.inference_mode()
def predict_logits(model: nn.Module, records, img_size: int, spec_mean, spec_std, batch_size: int = 32,
                   description: str = "predicting", device: torch.device = CPU, crop: float = 1.0) -> np.ndarray:
    """Logits of the model for the plain view of every record (the preprocessing every stage shares),
    computed on ``device``."""
    model.eval()
    outputs = []
    with progress_bar(description, total=len(records)) as advance, placed(model, device):
        for chunk in batched(list(records), batch_size):
            batch = np.stack([data_mod.preprocess(data_mod.load_image(r.path), img_size, spec_mean, spec_std, crop)
                              for r in chunk])
            outputs.append(model(torch.from_numpy(batch).to(device)).float().cpu().numpy())
            advance(len(chunk))
    return np.concatenate(outputs)
