"""The settings fine-tuning and cross-validation share, and their checks on user input.

Below both :mod:`edge_tl.finetune` and :mod:`edge_tl.crossval` (each imports it, neither the
other): one dataclass, saved in run.json, and :func:`validate_inputs`, every check that can fail on
user input before any trunk pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_tl import data as data_mod
from edge_tl.artifacts import check_new_run_dir
from edge_tl.backbones import BackboneSpec, get_backbone
from edge_tl.device import resolve_device
from edge_tl.errors import ConfigError
from edge_tl.features import resolve_runtime
from edge_tl.groups import compile_group_pattern
from edge_tl.head import DEFAULT_HEAD_L2
from edge_tl.metrics import resolve_ok_class
from edge_tl.out_of_fold import DEFAULT_FOLDS


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run; every field has a default and is saved in run.json."""

    backbone: str = "efficientnet_lite0"
    img_size: int | None = None
    epochs: int = 30
    unfreeze: int = 0
    ok_class: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 64
    lr: float = 1e-3
    unfreeze_lr_ratio: float = 0.1
    l2sp: float = 10.0  # --unfreeze: penalty strength * ||theta - theta_pretrained||^2 on the unfrozen blocks
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    head_l2: float = DEFAULT_HEAD_L2
    lbfgs_iterations: int = 10
    augmented_views: int = 4
    patience: int = 10
    cache_features: bool = True
    pretrained: bool = True
    weights: str | None = None
    strict: bool = False
    device: str = "auto"  # where frozen-trunk passes run: auto (a CUDA GPU if PyTorch sees one), cpu, cuda
    max_escape: float | None = None  # escape budget: lower the ok logit until out-of-fold escapes <= this share
    budget_folds: int = DEFAULT_FOLDS  # --max-escape: inner folds of the training split its shift is measured on
    crop: float = 1.0  # share of the squashed image kept, centred (1: the whole image; 0.875: ImageNet-style)
    group_pattern: str | None = None  # regex naming the part in a file name: its images stay on one side of splits
    trunk_runtime: str = "auto"  # frozen-trunk passes: auto (ONNX Runtime on a CPU, PyTorch on a GPU), torch, onnxruntime

    def resolved_img_size(self, spec: BackboneSpec) -> int:
        return self.img_size or spec.default_img_size


def validate_inputs(data_dir: Path, out: Path | None, cfg: FinetuneConfig, force: bool):
    """Every check that can fail on user input, before any expensive work."""
    spec = get_backbone(cfg.backbone)
    spec.check_img_size(cfg.resolved_img_size(spec))
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs {cfg.epochs} must be at least 1")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"validation fraction {cfg.val_fraction} must lie strictly between 0 and 1")
    if cfg.augmented_views < 0:
        raise ConfigError(f"augmented views {cfg.augmented_views} must be 0 or more")
    if cfg.unfreeze < 0:
        raise ConfigError(f"--unfreeze {cfg.unfreeze} must be 0 (frozen trunk) or more trunk blocks to train")
    if cfg.unfreeze and not cfg.cache_features:
        raise ConfigError(f"--unfreeze {cfg.unfreeze} trains on cached activations of the frozen prefix; drop --no-cache")
    if cfg.l2sp < 0:
        raise ConfigError(f"--l2sp {cfg.l2sp} must be 0 or more (0: no pull toward the pretrained weights)")
    resolve_runtime(cfg.trunk_runtime, resolve_device(cfg.device))
    data_mod.check_crop(cfg.crop)
    if cfg.group_pattern is not None:
        compile_group_pattern(cfg.group_pattern)
    if cfg.max_escape is not None and not 0.0 <= cfg.max_escape < 1.0:
        raise ConfigError(f"--max-escape {cfg.max_escape} must lie in [0, 1), e.g. 0.01 for at most 1% of defects passed")
    if cfg.head_l2 < 0:
        raise ConfigError(f"head L2 {cfg.head_l2} must be 0 or more (default {DEFAULT_HEAD_L2:g})")
    if isinstance(cfg.budget_folds, bool) or not isinstance(cfg.budget_folds, int) or cfg.budget_folds < 2:
        raise ConfigError(f"budget folds {cfg.budget_folds!r} must be a whole number of at least 2 (default "
                          f"{DEFAULT_FOLDS}; 10 gives each inner head nine tenths of the training split)")
    if cfg.max_escape is not None and cfg.ok_class is None:
        raise ConfigError("--max-escape needs --ok-class: name the good-part class whose logit it lowers")
    if out is not None:
        check_new_run_dir(out, force)
    scan = data_mod.scan_image_folder(data_dir, strict=cfg.strict)
    resolve_ok_class(scan.classes, cfg.ok_class)
    return spec, scan
