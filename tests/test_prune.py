"""Pruning with NNI on real backbones at 64 px: channel groups, speedup, shape spec, MACs, recovery, sweep."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from edge_tl import data
from edge_tl.artifacts import load_weights, save_weights
from edge_tl.backbones import build_model, get_backbone
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.metrics import balanced_accuracy, confusion_matrix
from edge_tl.model_cost import compare_ort_latency_ms, count_macs, count_params, ort_latency_ms
from edge_tl.prune import (
    aligned_keep,
    apply_shape_spec,
    find_prune_groups,
    prune_model,
)
from edge_tl.prune_sweep import sweep
from edge_tl.prune_reconstruct import reconstruct_pruned
from edge_tl.recovery import recover

IMG = 64


def _layer_macs(model: nn.Module) -> dict[str, int]:
    """Per-layer MACs by the textbook formula, from the shapes each layer sees (an oracle for count_macs)."""
    macs = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(m, args, out, name=name):
                n, c_out, h, w = out.shape
                macs[name] = h * w * c_out * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            hooks.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: macs.__setitem__(name, m.in_features * m.out_features)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, IMG, IMG))
    for handle in hooks:
        handle.remove()
    return macs


def _with_batch_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Random-init torchvision trunks output ~0 (BN stats 0/1); estimate BN stats so outputs carry signal."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, IMG, IMG, generator=generator) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # NNI's mask propagation runs many small convolutions; with 2 threads on a loaded 2-core
    # machine they are more than 10x slower than with one (OpenMP threads wait on each other)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return build_model("efficientnet_lite0", 4, IMG, pretrained=True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(8, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def pruned_lite0(lite0, images):
    return prune_model(lite0, IMG, 0.5, calibration_batches=[images])


def test_count_macs_and_params_match_hand_computed_tiny_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                          # 8x8 out: 64 px * 8 ch * 27 = 13824
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 4x4: 16 * 8 * 9 = 1152
        nn.Conv2d(8, 16, 1, bias=False),                        # 4x4: 16 * 16 * 8 = 2048
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),  # 80
    )
    assert count_macs(net, 8) == 13824 + 1152 + 2048 + 80
    assert count_params(net) == (3 * 8 * 9 + 8) + 8 * 9 + 8 * 16 + (16 * 5 + 5)


def test_aligned_keep_rounds_nni_count_to_multiples():
    assert aligned_keep(96, 0.5, 8) == 48
    assert aligned_keep(144, 0.5, 16) == 80  # NNI keeps 72 -> 4.5 blocks of 16 -> rounds half up
    assert aligned_keep(40, 0.95, 8) == 8  # never below one block
    assert aligned_keep(20, 0.01, 8) == 20  # rounding up past the width keeps the layer whole
    assert aligned_keep(20, 0.1, 8) == 16


def test_lite0_groups_are_expansion_depthwise_pairs(lite0):
    groups = find_prune_groups(lite0, IMG)
    # 16 blocks; block 1 is a depthwise-separable block fed by the stem: no expansion conv
    assert [g.block_index for g in groups] == list(range(2, 17))
    for group in groups:
        expansion = lite0.get_submodule(group.expansion)
        depthwise = lite0.get_submodule(group.depthwise)
        assert expansion.kernel_size == (1, 1) and depthwise.groups == depthwise.out_channels == group.channels
        assert group.gates == ()


def test_pruned_lite0_channels_match_spec_aligned_and_finite(lite0, pruned_lite0, images):
    pruned, spec = pruned_lite0
    json.dumps(spec)  # JSON-able
    for name, shape in spec["layers"].items():
        module = pruned.get_submodule(name)
        assert type(module).__name__ == shape["type"]
        assert {key: getattr(module, key) for key in shape if key != "type"} == {k: v for k, v in shape.items() if k != "type"}
    for group in find_prune_groups(lite0, IMG):
        expansion = pruned.get_submodule(group.expansion)
        depthwise = pruned.get_submodule(group.depthwise)
        assert expansion.out_channels == group.channels // 2 and expansion.out_channels % 8 == 0
        assert depthwise.in_channels == depthwise.out_channels == depthwise.groups == expansion.out_channels
    # residual-tied block outputs, stem and head input keep their widths
    stem = next(m for m in pruned.trunk.blocks[0].modules() if isinstance(m, nn.Conv2d))
    assert stem.out_channels == 32 and pruned.head.in_features == 1280
    block_outputs = [[m.out_channels for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
                     for block in (pruned.trunk.blocks, lite0.trunk.blocks)]
    assert block_outputs[0] == block_outputs[1]
    with torch.no_grad():
        assert torch.isfinite(pruned(images)).all()


def test_pruning_is_the_same_whatever_the_global_random_state_and_leaves_it_alone(lite0, pruned_lite0, images):
    # ModelSpeedup draws its mask-inference inputs from torch's global generator and drops every channel
    # constant over them: they come from a seeded generator of their own, so no caller's state can
    # change the result, and the caller's stream is not advanced
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    pruned, spec = prune_model(lite0, IMG, 0.5, calibration_batches=[images])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert spec == pruned_lite0[1]
    reference = pruned_lite0[0].state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in pruned.state_dict().items())


def test_pruned_macs_equal_the_per_layer_oracle_and_fall_by_the_expected_share(lite0, pruned_lite0):
    pruned, spec = pruned_lite0
    parent_layers = _layer_macs(lite0)
    expected = 0
    for name, macs in parent_layers.items():
        old, new = lite0.get_submodule(name), pruned.get_submodule(name)
        if isinstance(old, nn.Conv2d):
            expected += macs * new.out_channels * (new.in_channels // new.groups) // (old.out_channels * (old.in_channels // old.groups))
        else:
            expected += macs
    assert count_macs(pruned, IMG) == expected
    # every expansion group keeps exactly half: expansion, depthwise and projection-input MACs halve
    groups = find_prune_groups(lite0, IMG)
    grouped = sum(parent_layers[g.expansion] + parent_layers[g.depthwise] for g in groups)
    # the projection conv of each group's block reads the pruned channels
    projections = sum(parent_layers[f"trunk.blocks.{g.block_index}.body.{index}"] for g in groups
                      for index, m in enumerate(lite0.trunk.blocks[g.block_index].body)
                      if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == g.channels)
    assert projections > 0
    bound = count_macs(lite0, IMG) / (count_macs(lite0, IMG) - 0.5 * (grouped + projections))
    ratio = count_macs(lite0, IMG) / count_macs(pruned, IMG)
    assert ratio >= bound - 1e-9 and ratio > 1.6
    assert count_params(pruned) < count_params(lite0)


def test_l1_keeps_the_filters_with_largest_l1_norm(lite0):
    pruned, _ = prune_model(lite0, IMG, 0.0, sparsity_per_block={"5": 0.5})
    parent_weight = lite0.trunk.blocks[5].body[0].weight
    top = parent_weight.abs().sum((1, 2, 3)).topk(120).indices.sort().values
    assert torch.equal(pruned.trunk.blocks[5].body[0].weight, parent_weight[top])
    assert torch.equal(pruned.trunk.blocks[5].body[3].weight, lite0.trunk.blocks[5].body[3].weight[top])
    # only block 5 changed
    assert pruned.trunk.blocks[6].body[0].out_channels == 240


def test_reload_from_spec_and_safetensors_gives_identical_outputs(pruned_lite0, images, tmp_path):
    pruned, spec = pruned_lite0
    save_weights(tmp_path / "model.safetensors", pruned.state_dict())
    (tmp_path / "shape.json").write_text(json.dumps(spec))
    fresh = build_model("efficientnet_lite0", 4, IMG, pretrained=False)
    rebuilt = apply_shape_spec(fresh, json.loads((tmp_path / "shape.json").read_text()))
    rebuilt.load_state_dict(load_weights(tmp_path / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), pruned(images))


def test_reconstruction_solves_the_least_squares_oracle_and_brings_outputs_back(lite0, images):
    pruned, _ = prune_model(lite0, IMG, 0.5)
    groups = find_prune_groups(lite0, IMG)
    first = groups[0]  # block 2: its input is the parent's own (no earlier block was pruned)
    parent_weight = lite0.get_submodule(first.expansion).weight
    kept = {}
    for group in groups:
        kept[group.expansion] = kept[group.depthwise] = (
            lite0.get_submodule(group.expansion).weight.abs().sum((1, 2, 3))
            .topk(pruned.get_submodule(group.expansion).out_channels).indices.sort().values)
    assert torch.equal(pruned.get_submodule(first.expansion).weight, parent_weight[kept[first.expansion]])
    captured = {}
    handle = lite0.get_submodule(first.expansion).register_forward_hook(lambda m, a, out: captured.update(x=a[0], y=out))
    with torch.no_grad():
        error_before = (pruned(images) - lite0(images)).abs().mean()
    handle.remove()
    bn_name = first.expansion.rsplit(".", 1)[0] + "." + str(int(first.expansion.rsplit(".", 1)[1]) + 1)
    mean_before = pruned.get_submodule(bn_name).running_mean.clone()
    refit = reconstruct_pruned(pruned, lite0, images, kept, damping=1e-3)
    # from the first pruned block's expansion conv, depthwise convs included, through the final 1x1 conv
    assert refit[:2] == [first.expansion, first.depthwise] and refit[-1] == "trunk.blocks.17.0"
    x = captured["x"].permute(0, 2, 3, 1).reshape(-1, captured["x"].shape[1]).double().numpy()
    x = np.concatenate([x, np.ones((len(x), 1))], 1)  # the bias column
    y = captured["y"].permute(0, 2, 3, 1).reshape(-1, captured["y"].shape[1]).double().numpy()[:, kept[first.expansion]]
    original = np.concatenate([parent_weight[kept[first.expansion]].detach().double().numpy()[:, :, 0, 0],
                               np.zeros((len(y.T), 1))], 1)
    gram = x.T @ x
    damping = 1e-3 * np.diag(gram).mean()
    oracle = np.linalg.solve(gram + damping * np.eye(len(gram)), x.T @ y + damping * original.T)
    weight = pruned.get_submodule(first.expansion).weight.detach().double().numpy()
    assert np.allclose(weight[:, :, 0, 0], oracle[:-1].T, atol=1e-5)
    # the conv has no bias: the solved one went into the following BatchNorm's running mean
    shift = (mean_before - pruned.get_submodule(bn_name).running_mean).double().numpy()
    assert np.allclose(shift, oracle[-1], atol=1e-5)
    with torch.no_grad():
        error_after = (pruned(images) - lite0(images)).abs().mean()
    assert error_after < 0.5 * error_before


def test_contribution_keeps_the_channels_with_most_output_energy(lite0, images):
    """Oracle: per channel, sqrt(mean activation^2 at the projection input) * projection column norm."""
    from edge_tl.prune import _projection_name

    group = find_prune_groups(lite0, IMG)[3]
    projection = lite0.get_submodule(_projection_name(lite0, group))
    captured = {}
    handle = projection.register_forward_pre_hook(lambda m, args: captured.update(x=args[0].detach()))
    with torch.no_grad():
        lite0.eval()(images)
    handle.remove()
    activation = captured["x"].double().numpy()
    column_norms = np.linalg.norm(projection.weight.detach().double().numpy()[:, :, 0, 0], axis=0)
    score = np.sqrt((activation ** 2).mean(axis=(0, 2, 3))) * column_norms
    keep = aligned_keep(group.channels, 0.5, 8)
    expected = sorted(np.argsort(-score)[:keep].tolist())
    pruned, spec = prune_model(lite0, IMG, 0.5, method="contribution", calibration_batches=[images])
    assert spec["method"] == "contribution"
    # the convs are re-solved after selection, BatchNorm scales and shifts are not: they name the kept channels
    prefix, position = group.depthwise.rsplit(".", 1)
    bn = f"{prefix}.{int(position) + 1}"
    rows = torch.stack([pruned.get_submodule(bn).weight, pruned.get_submodule(bn).bias], 1).detach()
    parent_rows = torch.stack([lite0.get_submodule(bn).weight, lite0.get_submodule(bn).bias], 1).detach()
    kept = [c for c in range(group.channels) if any(torch.equal(parent_rows[c], row) for row in rows)]
    assert kept == expected


def test_contribution_reconstructs_better_than_l1(lite0, images):
    with torch.no_grad():
        reference = lite0.eval().trunk(images)
    errors = {}
    for method in ("l1", "contribution"):
        pruned, _ = prune_model(lite0, IMG, 0.5, method=method, calibration_batches=[images])
        with torch.no_grad():
            errors[method] = float((pruned.eval().trunk(images) - reference).norm() / reference.norm())
    assert errors["contribution"] < errors["l1"]


@pytest.mark.parametrize("method", ["fpgm", "taylor"])
def test_other_methods_give_aligned_groups(lite0, images, method):
    batches = [(images[:4], torch.tensor([0, 1, 2, 3])), (images[4:], torch.tensor([3, 2, 1, 0]))]
    pruned, spec = prune_model(lite0, IMG, 0.6, method=method, align=16, training_batches=batches)
    widths = [pruned.get_submodule(g.expansion).out_channels for g in find_prune_groups(lite0, IMG)]
    assert widths == [aligned_keep(g.channels, 0.6, 16) for g in find_prune_groups(lite0, IMG)]
    assert all(width % 16 == 0 for width in widths) and spec["method"] == method
    assert all(param.requires_grad == parent.requires_grad
               for param, parent in zip(pruned.parameters(), lite0.parameters()) if param.shape == parent.shape)


@pytest.mark.parametrize("name,se_gates", [("mobilenet_v2", 0), ("mobilenet_v3_small", 8), ("efficientnet_b0", 15)])
def test_torchvision_backbones_prune_with_squeeze_excitation_tied(name, se_gates, images):
    torch.manual_seed(0)
    model = _with_batch_statistics(build_model(name, 4, IMG, pretrained=False), seed=1)
    groups = find_prune_groups(model, IMG)
    assert sum(len(g.gates) for g in groups) == se_gates
    pruned, spec = prune_model(model, IMG, 0.5, calibration_batches=[images])
    for group in groups:
        keep = aligned_keep(group.channels, 0.5, 8)
        assert pruned.get_submodule(group.expansion).out_channels == keep
        assert pruned.get_submodule(group.depthwise).groups == keep
        for gate in group.gates:  # SE expand conv loses the same channels; its reduce conv's input follows
            assert pruned.get_submodule(gate).out_channels == keep
            reduce = pruned.get_submodule(gate.rsplit(".", 1)[0] + ".fc1")
            assert reduce.in_channels == keep
    with torch.no_grad():
        out = pruned(images)
    assert torch.isfinite(out).all() and out.std(0).max() > 0
    assert count_macs(model, IMG) / count_macs(pruned, IMG) > 1.5
    rebuilt = apply_shape_spec(build_model(name, 4, IMG, pretrained=False), spec)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), out)


def test_bad_arguments_are_config_errors(lite0):
    with pytest.raises(ConfigError, match="method 'l3'"):
        prune_model(lite0, IMG, 0.5, method="l3")
    with pytest.raises(ConfigError, match="sparsity 1.0"):
        prune_model(lite0, IMG, 1.0)
    with pytest.raises(ConfigError, match="block 1"):
        prune_model(lite0, IMG, 0.5, sparsity_per_block={1: 0.5})
    with pytest.raises(ConfigError, match="training_batches"):
        prune_model(lite0, IMG, 0.5, method="taylor")
    with pytest.raises(ConfigError, match="align 0"):
        prune_model(lite0, IMG, 0.5, align=0)


def test_apply_shape_spec_rejects_foreign_specs(pruned_lite0):
    _, spec = pruned_lite0
    model = build_model("mobilenet_v3_small", 4, IMG, pretrained=False)
    with pytest.raises(ArtifactError, match="does not have|but the layer is"):
        apply_shape_spec(model, spec)
    with pytest.raises(ArtifactError, match="format"):
        apply_shape_spec(model, {"layers": {}})


def _surface_tensors(surface_dataset, spec_name: str):
    scan = data.scan_image_folder(surface_dataset)
    spec = get_backbone(spec_name)
    x = torch.from_numpy(data.load_tensor_batch(scan.records, IMG, spec.mean, spec.std))
    y = torch.tensor([record.label for record in scan.records])
    return x, y, len(scan.classes)


def _balanced_accuracy_fn(x, y, classes):
    def val_fn(model):
        with torch.no_grad():
            predicted = model.eval()(x).argmax(1).numpy()
        return balanced_accuracy(confusion_matrix(y.numpy(), predicted, classes))
    return val_fn


def test_reconstruction_brings_held_out_images_closer_to_the_parent(surface_dataset, lite0):
    """Re-solved on half of the surface images, the pruned trunk tracks the parent on the other half."""
    x, _, _ = _surface_tensors(surface_dataset, "efficientnet_lite0")
    calibration, held_out = x[::2], x[1::2]
    solved, _ = prune_model(lite0, IMG, 0.5, calibration_batches=[calibration])
    unsolved, _ = prune_model(lite0, IMG, 0.5)  # the same (L1) channels, not re-solved
    with torch.no_grad():
        reference = lite0.eval().trunk(held_out)
        error = {name: float((model.eval().trunk(held_out) - reference).norm() / reference.norm())
                 for name, model in (("solved", solved), ("unsolved", unsolved))}
    assert error["solved"] < 0.6 * error["unsolved"]  # measured 0.44


def test_recover_with_distillation_lowers_the_loss_and_restores_the_best_epoch(surface_dataset, lite0):
    x, y, classes = _surface_tensors(surface_dataset, "efficientnet_lite0")
    teacher = copy.deepcopy(lite0)
    torch.manual_seed(0)
    with torch.no_grad():
        features = teacher.trunk(x)
    optimizer = torch.optim.Adam(teacher.head.parameters(), 1e-2)
    for _ in range(100):  # a teacher that knows the task: its head fitted on frozen features
        loss = nn.functional.cross_entropy(teacher.head(features), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    val_fn = _balanced_accuracy_fn(x, y, classes)
    assert val_fn(teacher) == 1.0
    student, _ = prune_model(teacher, IMG, 0.6, calibration_batches=[x[::2]])

    def batches():
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        return [(x[order[i:i + 16]], y[order[i:i + 16]]) for i in range(0, len(x), 16)]

    start = copy.deepcopy(student.state_dict())
    result = recover(student, teacher, batches, val_fn, epochs=3, lr=1e-4, patience=3)
    history = result["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3] and history[0]["train_loss"] is None
    assert history[3]["train_loss"] < 0.7 * history[1]["train_loss"]  # the distillation loss falls
    assert result["best_balanced_accuracy"] == max(row["balanced_accuracy"] for row in history)
    assert val_fn(student) == pytest.approx(result["best_balanced_accuracy"])
    # the weights are those of the best epoch: unchanged when that was epoch 0, trained otherwise
    unchanged = all(torch.equal(start[key], value) for key, value in student.state_dict().items())
    assert unchanged == (result["best_epoch"] == 0)
    assert not any(module.training for module in student.modules())


def test_recover_stops_early_and_keeps_the_starting_weights_when_nothing_improves(surface_dataset, lite0):
    x, y, _ = _surface_tensors(surface_dataset, "efficientnet_lite0")
    student, _ = prune_model(lite0, IMG, 0.5)
    before = copy.deepcopy(student.state_dict())
    result = recover(student, None, lambda: [(x[:8], y[:8])], lambda model: 0.5, epochs=5, lr=1e-2,
                     distill=False, patience=2)
    assert [row["epoch"] for row in result["history"]] == [0, 1, 2]
    assert result["best_epoch"] == 0 and result["stopped_early"]
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())


def test_sweep_recommends_the_fastest_row_within_tolerance(lite0):
    size = 32  # the smallest input lite0 takes keeps this sweep quick; the stages are the same as at 224
    val_x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        parent_prediction = lite0(val_x).argmax(1).numpy()

    def agreement(model):  # balanced accuracy against the parent's own predictions
        with torch.no_grad():
            return balanced_accuracy(confusion_matrix(parent_prediction, model.eval()(val_x).argmax(1).numpy(), 4))

    result = sweep(lite0, size, agreement, sparsities=(0.5,), calibration_batches=[val_x], latency_runs=5)
    assert result["stages"] == [[2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]
    assert result["parent"]["balanced_accuracy"] == pytest.approx(1.0)
    labels = [row["label"] for row in result["rows"]]
    assert labels[:5] == ["stage 0 (blocks 2-3) at 0.5", "stage 1 (blocks 4-5) at 0.5", "stage 2 (blocks 6-11) at 0.5",
                          "stage 3 (blocks 12-16) at 0.5", "all stages at 0.5"]
    for row in result["rows"]:
        assert row["macs_ratio"] > 1.0 and row["ort_latency_ms"] > 0 and math.isfinite(row["ort_latency_ratio"])
        json.dumps(row)
    assert result["rows"][4]["macs_ratio"] == max(row["macs_ratio"] for row in result["rows"])
    within = [row for row in result["rows"] if row["balanced_accuracy_delta"] >= -1.0]
    assert (len(labels) == 6) == any(row in within for row in result["rows"][:4])
    if within:
        assert result["recommended"]["ort_latency_ratio"] == max(row["ort_latency_ratio"] for row in within)
    else:
        assert result["recommended"] is None


def test_ort_latency_is_measured_on_real_sessions(lite0):
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    fast, slow = compare_ort_latency_ms([tiny, lite0], 128, runs=5, warmup=1)
    assert 0 < fast < slow  # ~0.1 MMAC vs ~130 MMAC: far apart even on a busy machine
    assert 0 < ort_latency_ms(tiny, 128, runs=3, warmup=1) < slow
