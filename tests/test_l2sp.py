"""L2-SP fine-tuning of the last trunk blocks on cached prefix activations, with the real pretrained EfficientNet-Lite0."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edge_tl.backbones import build_model, get_backbone
from edge_tl.data import scan_image_folder
from edge_tl.device import CPU, resolve_device
from edge_tl.features import cache_features
from edge_tl.finetune_config import FinetuneConfig
from edge_tl.tail import (
    TrainableTail,
    freeze_trunk,
    frozen_prefix,
    inner_split,
    l2sp_penalty,
    l2sp_proximal_step,
    tail_logits,
    train_tail,
)

IMG = 64
CFG = FinetuneConfig(img_size=IMG, epochs=4, augmented_views=1, unfreeze=2, seed=0, batch_size=8, patience=10,
                     lr=1e-2, unfreeze_lr_ratio=0.1)


@pytest.fixture(scope="module")
def cached(surface_dataset):
    """The surface images, a pretrained model and the cached activations entering its last 2 blocks."""
    scan = scan_image_folder(surface_dataset)
    records = sorted(scan.records, key=lambda record: str(record.path))
    spec = get_backbone("efficientnet_lite0")
    model = build_model(spec, num_classes=len(scan.classes), img_size=IMG, pretrained=True).eval()
    cache = cache_features(frozen_prefix(model, 2), records, IMG, spec, 1, 0, runtime="torch")
    labels = np.array([record.label for record in records])
    return model, cache, labels, scan.classes


def _trained(cached, device=CPU, **changes):
    model, cache, labels, classes = cached
    cfg = replace(CFG, **changes)
    trained = build_model("efficientnet_lite0", num_classes=len(classes), img_size=IMG, pretrained=True).eval()
    freeze_trunk(trained, cfg.unfreeze)
    fit, stop = inner_split(labels, None, 0.25, 0)
    tail = TrainableTail(trained, cfg.unfreeze)
    return trained, train_tail(tail, cache, labels, fit, stop, classes, cfg, device)


def test_l2sp_penalty_and_gradient_match_a_hand_computed_oracle():
    start = [torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([3.0])]
    params = [torch.tensor([[1.0, -1.0], [0.0, 0.5]], requires_grad=True), torch.tensor([1.0], requires_grad=True)]
    penalty = l2sp_penalty(params, start, 0.3)
    # 0.3 * (0.5^2 + 0 + 2^2 + 0.5^2 + 2^2) = 0.3 * 8.5
    assert penalty.item() == pytest.approx(2.55, abs=1e-6)
    penalty.backward()
    assert torch.allclose(params[0].grad, torch.tensor([[0.3, 0.0], [-1.2, 0.3]]))  # 2 * 0.3 * (p - p0)
    assert torch.allclose(params[1].grad, torch.tensor([-1.2]))
    assert l2sp_penalty([start[0].clone()], [start[0]], 1e9).item() == 0.0


def test_l2sp_proximal_step_is_the_hand_computed_minimiser():
    start = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([3.0])]
    params = [torch.tensor([1.0, -1.0, 0.0]), torch.tensor([1.0])]
    after = [param.clone() for param in params]
    l2sp_proximal_step(after, start, 0.3, 0.5)  # p0 + (p - p0) / (1 + 2 * 0.5 * 0.3)
    assert torch.allclose(after[0], torch.tensor([0.5 + 0.5 / 1.3, -1.0, 2.0 - 2.0 / 1.3]))
    assert torch.allclose(after[1], torch.tensor([3.0 - 2.0 / 1.3]))
    # the minimiser of 0.3 ||q - p0||^2 + ||q - p||^2 / (2 * 0.5): the gradient vanishes there
    point = [q.clone().requires_grad_(True) for q in after]
    objective = l2sp_penalty(point, start, 0.3) + sum(((q - p) ** 2).sum() for q, p in zip(point, params))
    objective.backward()
    assert all(q.grad.abs().max().item() < 1e-6 for q in point)
    l2sp_proximal_step(after, start, 0.0, 0.5)  # strength 0: no pull
    assert torch.allclose(after[0], torch.tensor([0.5 + 0.5 / 1.3, -1.0, 2.0 - 2.0 / 1.3]))


def test_cached_prefix_tail_gives_the_full_models_logits(cached, surface_dataset):
    model, cache, _, _ = cached
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(6, 3, IMG, IMG, generator=generator)
    for unfreeze in (0, 1, 3):
        with torch.no_grad():
            direct = model(batch)
            via_tail = TrainableTail(model, unfreeze).eval()(frozen_prefix(model, unfreeze)(batch))
        assert (via_tail - direct).abs().max().item() <= 1e-5 * direct.abs().max().item()
    # the cached plain views (float16 activations) against the full model on the same preprocessed images
    from edge_tl.data import load_tensor_batch

    records = sorted(scan_image_folder(surface_dataset).records, key=lambda record: str(record.path))
    spec = get_backbone("efficientnet_lite0")
    images = torch.from_numpy(load_tensor_batch(records, IMG, spec.mean, spec.std))
    with torch.no_grad():
        direct = model(images)
    via_cache = tail_logits(TrainableTail(model, 2), cache[0])
    assert (via_cache - direct).abs().max().item() <= 1e-2 * direct.abs().max().item()


def _distances(history):
    return [row["l2sp_distance"] for row in history]


def test_large_l2sp_keeps_the_tail_at_its_pretrained_weights_and_zero_lets_it_move(cached):
    pretrained = cached[0]
    norm = sum(p.pow(2).sum() for p in TrainableTail(pretrained, 2).blocks.parameters()).item()
    held, held_fit = _trained(cached, l2sp=1e9)
    free, free_fit = _trained(cached, l2sp=0.0)
    held_moves, free_moves = _distances(held_fit.history), _distances(free_fit.history)
    assert held_moves[0] == free_moves[0] == 0.0  # epoch 0: the linear probe on the pretrained blocks
    assert len(free_moves) == CFG.epochs + 1
    assert max(held_moves) <= 1e-12 * norm  # squared distance
    assert free_moves[-1] >= 1e-4 * norm and free_moves[-1] >= 1e6 * max(held_moves)
    reference = dict(TrainableTail(pretrained, 2).blocks.named_parameters())
    for name, param in TrainableTail(held, 2).blocks.named_parameters():  # the restored weights too
        assert torch.allclose(param, reference[name], atol=1e-7, rtol=0), name


def test_training_leaves_batchnorm_statistics_and_the_frozen_blocks_bit_identical(cached):
    pretrained = cached[0]
    trained, fitted = _trained(cached, l2sp=0.0, patience=1)
    buffers = dict(pretrained.trunk.named_buffers())
    assert any(name.endswith("running_var") for name in buffers)
    for name, buffer in trained.trunk.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    blocks = len(trained.trunk.blocks)
    for index in range(blocks - 2):
        fresh = pretrained.trunk.blocks[index].state_dict()
        assert all(torch.equal(t, fresh[n]) for n, t in trained.trunk.blocks[index].state_dict().items()), index
    # early stopping on the inner split: restored epoch is the best (balanced accuracy, -loss) of the history
    keys = [(row["stop_balanced_accuracy"], -row["stop_loss"]) for row in fitted.history]
    assert keys.index(max(keys)) == fitted.best_epoch


def test_inner_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    fit, stop = inner_split(labels, None, 0.2, 1)
    assert sorted([*fit, *stop]) == list(range(30))
    assert np.bincount(labels[stop]).tolist() == [2, 2, 2]
    again = inner_split(labels, None, 0.2, 1)
    assert np.array_equal(again[1], stop)


def test_the_tail_ends_with_the_converged_head_on_its_own_features(cached):
    """The final head is the class-weighted, L2 logistic regression on the trained tail's features of every
    training view (fit and stop): the objective's gradient vanishes at it."""
    from edge_tl.data import class_weights
    from edge_tl.head import Standardize
    from edge_tl.tail import tail_features

    _, cache, labels, classes = cached
    trained, _ = _trained(cached, l2sp=0.0)
    tail = TrainableTail(trained, 2).eval()
    train = np.arange(len(labels))  # inner_split's fit and stop: every image of the fixture
    pooled = torch.stack([tail_features(tail, cache[view, torch.from_numpy(train)]) for view in range(len(cache))])
    standardize = Standardize(pooled[0])
    # the deployed head has the standardisation folded in: unfold it
    weight = (tail.head.weight.detach() * standardize.std).requires_grad_(True)
    bias = (tail.head.bias.detach() + (tail.head.weight.detach() * standardize.mean).sum(1)).requires_grad_(True)
    inputs = standardize(pooled.reshape(-1, pooled.shape[-1]))
    targets = torch.from_numpy(np.tile(labels, len(pooled)))
    weights = torch.as_tensor(class_weights(labels, len(classes)), dtype=torch.float32)
    objective = (torch.nn.functional.cross_entropy(inputs @ weight.T + bias, targets, weight=weights)
                 + CFG.head_l2 * weight.pow(2).sum())
    objective.backward()
    assert max(weight.grad.abs().max().item(), bias.grad.abs().max().item()) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
def test_the_unfrozen_tail_trains_on_the_gpu_like_on_the_cpu(cached):
    """--unfreeze on a GPU: the fine-tuning steps run there, the model comes back to the CPU with its
    BatchNorm statistics untouched, and it scores the images as the CPU-trained tail does (up to TF32)."""
    pretrained, cache, labels, classes = cached
    # every 4th image: few steps, so rounding (TF32 on the GPU) cannot grow into another trajectory
    cache = cache[:, ::4]
    small = (pretrained, cache, labels[::4], classes)
    on_cpu, cpu_fit = _trained(small, l2sp=0.0, epochs=3, patience=99)
    on_gpu, gpu_fit = _trained(small, resolve_device("cuda"), l2sp=0.0, epochs=3, patience=99)
    assert gpu_fit.device.startswith("cuda") and cpu_fit.device == "cpu"
    assert all(tensor.device.type == "cpu" for tensor in on_gpu.state_dict().values())
    buffers = dict(pretrained.trunk.named_buffers())
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in on_gpu.trunk.named_buffers())
    moved = [row["l2sp_distance"] for row in gpu_fit.history]
    assert moved[0] == 0.0 and moved[-1] > 0.0  # the blocks did train on the GPU
    cpu_logits = tail_logits(TrainableTail(on_cpu, 2), cache[0])
    gpu_logits = tail_logits(TrainableTail(on_gpu, 2), cache[0])
    agreement = (cpu_logits.argmax(1) == gpu_logits.argmax(1)).float().mean().item()
    assert agreement >= 0.9, agreement
    assert ((gpu_logits - cpu_logits).norm() / cpu_logits.norm()).item() < 0.1
