"""Frozen-trunk fine-tuning on generated images with the real pretrained EfficientNet-Lite0 trunk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_tl.backbones import build_model
from edge_tl.finetune import (
    FinetuneConfig,
    evaluate,
    finetune,
    freeze_trunk,
    load_checkpoint,
    predict_logits,
    run_records,
)
from edge_tl.synthetic import make_surface_dataset

IMG = 64
FAST = FinetuneConfig(img_size=IMG, epochs=8, augmented_views=2, ok_class="ok", seed=0, patience=8)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """Large enough (30 per class) that validation metrics mean something."""
    return make_surface_dataset(tmp_path_factory.mktemp("textures") / "data", images_per_class=30, img_size=IMG)


@pytest.fixture(scope="module")
def finetuned_run(textures, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    return finetune(textures, out, FAST)


def test_run_directory_has_checkpoint_manifest_and_metrics(finetuned_run):
    run_dir = finetuned_run.run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "model.safetensors", "run.json"]
    run_info = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run_info["backbone"] == "efficientnet_lite0" and run_info["img_size"] == IMG
    assert run_info["classes"] == ["crack", "ok", "scratch", "spot"]
    assert len(run_info["split"]["train_hash"]) == 64 and run_info["split"]["seed"] == 0
    assert {"torch", "onnxruntime", "timm"} <= set(run_info["versions"])
    assert set(metrics) >= {"classes", "accuracy", "balanced_accuracy", "per_class", "confusion_matrix",
                            "escape_rate", "false_reject_rate"}
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == len(run_info["split"]["val_files"])
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("accuracy", "balanced_accuracy", "escape_rate"))
    # A pretrained trunk with a trained head separates these textures well above chance (0.25).
    assert metrics["balanced_accuracy"] >= 0.6


def test_frozen_trunk_is_bit_identical_and_only_head_trains(finetuned_run):
    model, run_info = load_checkpoint(finetuned_run.run_dir)
    fresh = build_model("efficientnet_lite0", num_classes=4, img_size=IMG, pretrained=True)
    tuned_trunk = model.trunk.state_dict()
    for name, tensor in fresh.trunk.state_dict().items():
        assert torch.equal(tensor, tuned_trunk[name]), name  # weights and BN running statistics
    assert not torch.equal(fresh.head.weight, model.head.weight)

    trainable = freeze_trunk(fresh, 0)
    assert trainable == []
    requires_grad = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
    assert requires_grad == sum(p.numel() for p in fresh.head.parameters())


def test_checkpoint_reloads_to_the_same_metrics(finetuned_run, textures, tmp_path):
    metrics = evaluate(finetuned_run.run_dir, textures, tmp_path / "eval.json")
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == metrics
    assert metrics["classes"] == finetuned_run.metrics["classes"]
    assert sum(row["support"] for row in metrics["per_class"].values()) == 120


def test_unfreeze_trains_only_the_last_blocks(surface_dataset, tmp_path):
    cfg = FinetuneConfig(img_size=IMG, epochs=4, augmented_views=1, unfreeze=2, seed=0, batch_size=8, l2sp=0.0)
    result = finetune(surface_dataset, tmp_path / "run", cfg)
    model, _ = load_checkpoint(result.run_dir)
    # early stopping watched an inner split of the training split, never the reported validation split
    assert [row["epoch"] for row in result.history] == list(range(cfg.epochs + 1))  # epoch 0: the linear probe
    assert "stop_balanced_accuracy" in result.history[0] and "val_balanced_accuracy" not in result.history[0]
    assert result.history[-1]["l2sp_distance"] > 0.0  # the tail trained (kept only if the inner split says so)
    tuned_tail = result.metrics["best_epoch"] > 0
    fresh = build_model("efficientnet_lite0", num_classes=4, img_size=IMG, pretrained=True)
    blocks = len(model.trunk.blocks)
    for index in range(blocks):
        tuned = model.trunk.blocks[index].state_dict()
        same = all(torch.equal(t, tuned[n]) for n, t in fresh.trunk.blocks[index].state_dict().items())
        assert same == (index < blocks - 2 or not tuned_tail), index
    # the unfrozen blocks' weights trained, their BatchNorm statistics did not move
    statistics = [(name, buffer) for name, buffer in fresh.trunk.blocks.named_buffers()
                  if name.split(".")[0] in {str(blocks - 2), str(blocks - 1)}]
    assert {name.rsplit(".", 1)[1] for name, _ in statistics} >= {"running_mean", "running_var"}
    tuned_buffers = dict(model.trunk.blocks.named_buffers())
    for name, buffer in statistics:
        assert torch.equal(buffer, tuned_buffers[name]), name


def test_early_stopping_restores_the_best_epoch(textures, tmp_path):
    """Patience 2: training stops 2 epochs after the best one, and the saved head is that epoch's."""
    cfg = FinetuneConfig(img_size=IMG, epochs=30, augmented_views=0, ok_class="ok", seed=0, patience=2,
                         lbfgs_iterations=20)
    result = finetune(textures, tmp_path / "run", cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = result.history
    best = metrics["best_epoch"]
    assert metrics["epochs_run"] == len(history) == best + cfg.patience < cfg.epochs
    keys = [(row["val_balanced_accuracy"], -row["val_loss"]) for row in history]
    assert keys.index(max(keys)) == best - 1  # the first epoch of the best (balanced accuracy, -loss)
    model, run_info = load_checkpoint(tmp_path / "run")
    val = run_records(run_info, "val")
    logits = predict_logits(model, val, IMG, run_info["mean"], run_info["std"])
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor([r.label for r in val])))
    assert loss == pytest.approx(history[best - 1]["val_loss"], rel=1e-4)
    assert abs(history[-1]["val_loss"] - history[best - 1]["val_loss"]) > 1e-3  # the last epoch's head differs


def test_cached_and_uncached_training_reach_the_same_accuracy(finetuned_run, textures, tmp_path):
    cached = finetuned_run
    uncached = finetune(textures, tmp_path / "uncached",
                        FinetuneConfig(**{**FAST.__dict__, "cache_features": False}))
    assert uncached.metrics["balanced_accuracy"] >= 0.6
    assert abs(cached.metrics["balanced_accuracy"] - uncached.metrics["balanced_accuracy"]) <= 0.15
    assert cached.seconds_per_epoch < uncached.seconds_per_epoch


def test_fit_linear_head_is_invariant_to_feature_scale_and_separates():
    from edge_tl.head import fit_linear_head

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 12, generator=generator)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).long().numpy() + 2 * (features[:, 2] > 1.0).long().numpy()
    head = fit_linear_head(features, labels, 4, l2=1e-3)
    scale, shift = 7.0, torch.linspace(-3.0, 3.0, 12)  # one scale: the std floor scales with it
    scaled_head = fit_linear_head(features * scale + shift, labels, 4, l2=1e-3)
    with torch.no_grad():
        logits, scaled_logits = head(features), scaled_head(features * scale + shift)
    assert (logits.argmax(1).numpy() == labels).mean() > 0.97
    # standardisation inside the fit makes it see the same problem; the folded heads agree
    assert torch.allclose(logits, scaled_logits, atol=3e-3 * float(logits.abs().max()))
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (4, 12)


@pytest.mark.parametrize("unfreeze", [0, 2])
def test_onnxruntime_frozen_pass_matches_pytorch(textures, unfreeze):
    """The default CPU pass (the trunk, or the prefix before unfrozen blocks, run by ONNX Runtime) computes
    what PyTorch computes."""
    from edge_tl.backbones import get_backbone
    from edge_tl.data import scan_image_folder
    from edge_tl.features import cache_features, resolve_runtime
    from edge_tl.finetune import frozen_prefix

    model = build_model("efficientnet_lite0", num_classes=4, img_size=IMG, pretrained=True).eval()
    prefix = frozen_prefix(model, unfreeze)
    records = scan_image_folder(textures).records[:10]
    spec = get_backbone("efficientnet_lite0")
    cpu = torch.device("cpu")
    assert resolve_runtime("auto", cpu) == "onnxruntime"
    eager = cache_features(prefix, records, IMG, spec, 1, seed=3, runtime="torch").float()
    ort = cache_features(prefix, records, IMG, spec, 1, seed=3, runtime="onnxruntime").float()
    assert ort.shape == eager.shape and ort.shape[:2] == (2, 10)
    scale = eager.abs().max().item()
    # feature maps are cached in float16 (a rounding step of 1/1024 relative): one step apart at most
    assert scale > 0 and (ort - eager).abs().max().item() <= (2e-3 if unfreeze else 1e-4) * scale


def test_unknown_trunk_runtime_is_a_config_error(textures, tmp_path):
    from edge_tl.errors import ConfigError

    with pytest.raises(ConfigError, match="trunk runtime 'tensorrt' is unknown"):
        finetune(textures, tmp_path / "run", FinetuneConfig(img_size=IMG, trunk_runtime="tensorrt"))
    assert not (tmp_path / "run").exists()
