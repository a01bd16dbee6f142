"""Structured pruning of the trunk with NNI, the pruned-shape spec, and the per-stage sweep.

What is pruned: the expansion (1x1) convolution of every inverted-residual block, by output
channel. The depthwise convolution after it and any squeeze-excitation gate scaling its output
lose the same channels (NNI's channel-dependency analysis names these groups; edge-tl gives
every member the expansion conv's mask so ModelSpeedup's conflict fixing keeps them), and
ModelSpeedup propagates the removal into the projection conv's input and the SE reduce conv's
input. Block outputs tied by residual additions, the stem and the final conv (the head's input)
keep their widths. Kept counts are rounded to multiples of ``align``: where NNI's ratio rule would
keep k channels, edge-tl asks the NNI pruner for round(k / align) * align (at least ``align``), so
the same importance ranking picks them. Masks are made and applied at a 32 px probe input (channel
masks do not depend on the spatial size), which keeps ModelSpeedup's propagation fast.

With calibration images, the 1x1 and depthwise convs from the first pruned block on are then
re-solved by least squares so their outputs match the parent's on those images
(:mod:`edge_tl.prune_reconstruct`). On the magnetic-tile run this took contribution-pruned
EfficientNet-Lite0 at sparsity 0.5 to 0.826 balanced accuracy before the head refit (parent 0.935;
0.785 with sampled-pixel refits of the 1x1 convs only, 0.21 with none).

Cost measurement lives in ``edge_tl.model_cost``, the per-stage sweep in ``edge_tl.prune_sweep`` and
recovery training in ``edge_tl.recovery`` (its public names are re-exported here).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edge_tl import nni_compat
from edge_tl.backbones import EdgeClassifier
from edge_tl.errors import ArtifactError, ConfigError
from edge_tl.prune_reconstruct import reconstruct_pruned
from edge_tl.recovery import distillation_loss, recover  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

METHODS = ("contribution", "l1", "l2", "fpgm", "taylor")
SPEC_FORMAT = "edge-tl-shape-spec/1"
PROBE_IMG_SIZE = 32


@dataclass(frozen=True)
class PruneGroup:
    """Layers that lose the same channels: an expansion conv, its depthwise conv and SE gate convs."""

    block_index: int
    expansion: str
    depthwise: str
    gates: tuple[str, ...]
    channels: int


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size == (1, 1)


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["trunk", "blocks"] and parts[2].isdigit() else None


def _traced(model: nn.Module, img_size: int) -> torch.fx.GraphModule:
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(torch.zeros(1, 3, img_size, img_size))
    return graph_module


def find_prune_groups(model: EdgeClassifier, img_size: int) -> list[PruneGroup]:
    """The prunable channel groups of ``model``'s trunk, one per inverted-residual block with an expansion conv."""
    graph_module = _traced(model, img_size)
    modules = dict(model.named_modules())
    groups = []
    for names in nni_compat.channel_dependency_sets(graph_module):
        depthwise = [name for name in names if _is_depthwise(modules.get(name))]
        if len(depthwise) != 1:
            continue  # outputs tied by residual additions: left alone
        parents = nni_compat.adjacent_layer_names(graph_module, depthwise[0], "parent")
        expansion = parents[0] if len(parents) == 1 else None
        gates = sorted(names - {depthwise[0], expansion})
        channels = modules[depthwise[0]].out_channels
        block = _block_index(depthwise[0])
        if (expansion not in names or not _is_pointwise(modules[expansion]) or block is None
                or any(_block_index(name) != block for name in names)
                or not all(_is_pointwise(modules[g]) and modules[g].out_channels == channels for g in gates)):
            log.debug("not pruning channel group %s (no 1x1 expansion conv inside one block)", sorted(names))
            continue
        groups.append(PruneGroup(block, expansion, depthwise[0], tuple(gates), channels))
    return sorted(groups, key=lambda group: group.block_index)


def aligned_keep(channels: int, sparsity: float, align: int) -> int:
    """Channels kept: NNI's ratio rule (``channels - int(channels * sparsity)``) rounded to a multiple of ``align``."""
    kept = channels - int(channels * sparsity)
    return min(channels, max(align, align * math.floor(kept / align + 0.5)))


def _layer_shapes(model: nn.Module) -> dict[str, dict]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {"type": "Conv2d", "in_channels": module.in_channels,
                            "out_channels": module.out_channels, "groups": module.groups}
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "num_features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features}
    return shapes


def _check_options(img_size, sparsity, method, align, training_batches, calibration_batches) -> None:
    if method not in METHODS:
        raise ConfigError(f"pruning method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ConfigError(f"align {align!r} is invalid; use a positive integer such as 8 or 16")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 32:
        raise ConfigError(f"image size {img_size!r} is invalid for pruning; use the model's input size (>= 32)")
    if method == "taylor" and training_batches is None:
        raise ConfigError("method 'taylor' needs training_batches (labelled (x, y) batches); pass them or use l1")
    if method == "contribution" and calibration_batches is None:
        raise ConfigError("method 'contribution' needs calibration_batches (training images); pass them or use l1")
    _check_sparsity(sparsity)


def _check_sparsity(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"sparsity {value!r} is invalid; use a fraction in [0, 1), e.g. 0.5")


def _per_block(sparsity_per_block: Mapping | None, groups: list[PruneGroup]) -> dict[int, float]:
    per_block = {}
    prunable = [group.block_index for group in groups]
    for key, value in (sparsity_per_block or {}).items():
        block = int(key) if str(key).isdigit() else None
        if block not in prunable:
            raise ConfigError(f"sparsity_per_block names block {key!r}, which has no prunable expansion conv; "
                              f"prunable blocks: {prunable}")
        _check_sparsity(value)
        per_block[block] = value
    return per_block


def prune_model(
    model: EdgeClassifier,
    img_size: int,
    sparsity: float,
    method: str = "l1",
    align: int = 8,
    sparsity_per_block: Mapping[int | str, float] | None = None,
    calibration_batches: Iterable | None = None,
    training_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[EdgeClassifier, dict]:
    """A physically smaller copy of ``model`` and its shape spec; ``model`` is not changed.

    ``sparsity`` is the share of each expansion conv's channels removed (``sparsity_per_block``
    overrides it per trunk block index). ``calibration_batches`` (images, or (images, labels); all
    of them) rank channels and re-solve the trunk's convs against the parent; ``training_batches``
    (labelled) feed the taylor method's gradients.
    The spec holds, for every conv/bn/linear whose shape changed, its new channel counts.
    """
    _check_options(img_size, sparsity, method, align, training_batches, calibration_batches)
    pruned = copy.deepcopy(model).eval()
    # channel masks do not depend on the spatial size: analyse and speed up at a small probe size
    probe_size = min(img_size, PROBE_IMG_SIZE)
    groups = find_prune_groups(pruned, probe_size)
    per_block = _per_block(sparsity_per_block, groups)
    plan = {}
    for group in groups:
        keep = aligned_keep(group.channels, per_block.get(group.block_index, sparsity), align)
        if keep < group.channels:
            plan[group] = keep
    before = _layer_shapes(pruned)
    if plan:
        requires_grad = {name: param.requires_grad for name, param in pruned.named_parameters()}
        images = _calibration_images(calibration_batches) if calibration_batches is not None else None
        masks = _expansion_masks(pruned, plan, method, training_batches, images)
        _add_tied_masks(pruned, masks, plan)
        nni_compat.speedup(pruned, torch.zeros(1, 3, probe_size, probe_size), masks)  # NNI draws its own inputs
        _check_pruned(pruned, plan, before)
        for name, param in pruned.named_parameters():
            param.requires_grad_(requires_grad[name])
        if calibration_batches is not None:
            kept = {}
            for group in plan:
                kept[group.expansion] = kept[group.depthwise] = masks[group.expansion]["weight"].flatten(1).any(1).nonzero().flatten()
            reconstruct_pruned(pruned, model, images, kept)
        else:
            log.warning("pruned without calibration images: the convs are not re-solved against the parent, "
                        "so accuracy before recovery will be low; pass calibration_batches")
    after = _layer_shapes(pruned)
    spec = {
        "format": SPEC_FORMAT, "method": method, "sparsity": sparsity, "align": align,
        "sparsity_per_block": {str(block): value for block, value in sorted(per_block.items())},
        "layers": {name: shape for name, shape in after.items() if shape != before[name]},
    }
    log.info("pruned %d of %d expansion groups; %d layers changed shape", len(plan), len(groups), len(spec["layers"]))
    return pruned, spec


def _projection_name(model: nn.Module, group: PruneGroup) -> str:
    """The 1x1 conv of ``group``'s block that reads the group's channels (the block's projection)."""
    prefix = f"trunk.blocks.{group.block_index}."
    names = [name for name, module in model.named_modules()
             if name.startswith(prefix) and _is_pointwise(module) and module.in_channels == group.channels
             and name not in (group.expansion, *group.gates)]
    if len(names) != 1:
        raise RuntimeError(f"block {group.block_index} has {len(names)} projection convs reading {group.channels} channels")
    return names[0]


def _contribution_masks(model: nn.Module, plan: dict[PruneGroup, int], images: torch.Tensor) -> dict:
    """Keep the channels that carry the most energy into the block's output.

    A channel's contribution to the projection conv's output is its activation times its column of
    the projection weight, so its importance is ``sqrt(E[a_c^2]) * ||W_proj[:, c]||`` measured on the
    calibration images: data-driven, unlike weight norms of the expansion conv alone.
    """
    projections = {group: _projection_name(model, group) for group in plan}
    energy: dict[PruneGroup, torch.Tensor] = {}

    def record(group):
        def hook(module, inputs):
            energy[group] = energy.get(group, 0) + inputs[0].detach().double().pow(2).mean((0, 2, 3)) * len(inputs[0])
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(group)) for group, name in projections.items()]
    try:
        with torch.inference_mode():
            _chunked(model.eval(), images)
    finally:
        for handle in handles:
            handle.remove()
    masks = {}
    for group, keep in plan.items():
        weight = model.get_submodule(projections[group]).weight.detach().double()
        score = (energy[group] / len(images)).sqrt() * weight.flatten(1).norm(dim=0)
        kept = torch.zeros(group.channels, dtype=torch.bool)
        kept[score.argsort(descending=True)[:keep]] = True
        expansion = model.get_submodule(group.expansion)
        masks[group.expansion] = {"weight": kept.view(-1, 1, 1, 1).expand_as(expansion.weight).float().clone()}
        if expansion.bias is not None:
            masks[group.expansion]["bias"] = kept.float()
    return masks


def _expansion_masks(model: nn.Module, plan: dict[PruneGroup, int], method: str, training_batches,
                     images: torch.Tensor | None = None) -> dict:
    if method == "contribution":
        return _contribution_masks(model, plan, images)
    # the ratio is chosen so that NNI's int(channels * ratio) removes exactly channels - keep
    config_list = [{"op_names": [group.expansion], "sparse_ratio": (group.channels - keep + 0.5) / group.channels}
                   for group, keep in plan.items()]
    if method != "taylor":
        return nni_compat.norm_pruner_masks(method, model, config_list)
    batches = [(x.float(), y.long()) for x, y in training_batches]
    if not batches:
        raise ConfigError("training_batches yielded no batch; the taylor method needs at least one labelled batch")
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)  # a fine-tuned trunk is frozen; Taylor importance needs its gradients
    try:
        return nni_compat.taylor_pruner_masks(model, config_list, batches, F.cross_entropy)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _add_tied_masks(model: nn.Module, masks: dict, plan: dict[PruneGroup, int]) -> None:
    for group, keep in plan.items():
        kept = masks[group.expansion]["weight"].flatten(1).any(1)
        if int(kept.sum()) != keep:
            raise RuntimeError(f"NNI kept {int(kept.sum())} of {group.channels} channels of {group.expansion}, expected {keep}")
        for name in (group.depthwise, *group.gates):
            module = model.get_submodule(name)
            weight = torch.zeros_like(module.weight)
            weight[kept] = 1.0
            masks[name] = {"weight": weight}
            if module.bias is not None:
                masks[name]["bias"] = kept.float()


def _check_pruned(model: nn.Module, plan: dict[PruneGroup, int], before: dict[str, dict]) -> None:
    """Output widths change exactly where planned (NNI also drops channels it finds constant)."""
    planned = {name: keep for group, keep in plan.items() for name in (group.expansion, group.depthwise, *group.gates)}
    for name, shape in _layer_shapes(model).items():
        if shape["type"] == "BatchNorm2d":
            continue
        key = "out_channels" if shape["type"] == "Conv2d" else "out_features"
        expected = planned.get(name, before[name][key])
        if shape[key] != expected:
            raise RuntimeError(f"ModelSpeedup left {name} with {shape[key]} output channels, expected {expected}")


def _calibration_images(batches: Iterable) -> torch.Tensor:
    """Every image of ``batches`` (the caller picks how many: PruneConfig.calibration_images)."""
    images = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]
    images = [x.float() for x in images if len(x)]
    if not images:
        raise ConfigError("calibration_batches yielded no image; pass at least one batch of training images")
    return torch.cat(images)


def _chunked(module: nn.Module, x: torch.Tensor, size: int = 32) -> torch.Tensor:
    return torch.cat([module(chunk) for chunk in x.split(size)])


def apply_shape_spec(model: EdgeClassifier, spec: Mapping) -> EdgeClassifier:
    """Resize ``model``'s layers (in place) to the spec's channel counts, ready for a strict state-dict load.

    ``model`` is a freshly built, unpruned backbone of the same name and input size as the one
    that was pruned. New layers are initialised, not copied: load the pruned weights next.
    """
    if not isinstance(spec, Mapping) or spec.get("format") != SPEC_FORMAT or not isinstance(spec.get("layers"), Mapping):
        raise ArtifactError(f"shape spec is not in format {SPEC_FORMAT!r}; re-run pruning to write shape.json")
    for name, shape in spec["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"shape spec names layer {name!r}, which the model does not have; "
                                "rebuild the backbone the spec was made for") from None
        if not isinstance(shape, Mapping) or type(old).__name__ != shape.get("type"):
            raise ArtifactError(f"shape spec entry {name!r} is {shape!r}, but the layer is {type(old).__name__}; "
                                "rebuild the backbone the spec was made for")
        try:
            new = _resized(old, shape)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ArtifactError(f"shape spec entry {name!r} ({shape!r}) is invalid: {err}; re-run pruning") from err
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model.eval()


def _resized(old: nn.Module, shape: Mapping) -> nn.Module:
    for key, value in shape.items():
        if key != "type" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer")
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(shape["in_channels"], shape["out_channels"], old.kernel_size, old.stride, old.padding,
                         old.dilation, shape["groups"], old.bias is not None, old.padding_mode)
    if isinstance(old, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats)
    return nn.Linear(shape["in_features"], shape["out_features"], old.bias is not None)
