"""Pruned-trunk reconstruction: the convolutions after a channel cut re-solved against the parent.

Removing half of a block's expansion channels leaves every later layer reading inputs it was not
trained on. Block by block through ``trunk.blocks``, from the first pruned block on, every 1x1 and
depthwise convolution of the pruned model gets the least-squares weights and bias that map its
input *in the pruned model* (the blocks before it already re-solved) onto the *parent's* output of
the same layer (pre-BatchNorm; for a pruned expansion or depthwise conv, the parent's kept
channels), ridge-damped toward its current weights, so upstream error is corrected as well as the
missing channels (He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", 2017).
Depthwise convolutions are solved per channel. The solved bias goes into the conv's own bias or,
for the usual bias-free conv, into the running mean of the BatchNorm that follows it, so the
pruned architecture is unchanged.

Measured on magnetic-tile (efficientnet_lite0 224 px, sparsity 0.5, contribution importance, 128
training images): balanced accuracy before any head refit 0.826, against 0.785 for sampled-pixel
refits of the 1x1 convs alone; 0.926 against 0.917 after the head refit (parent 0.935).
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from edge_tl.reconstruct import CHUNK, accumulated_normal_equations, ridge_solve

log = logging.getLogger(__name__)

DEFAULT_DAMPING = 1e-3  # relative to the mean input energy: the targets are float, nothing to round


def _refit_targets(block: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(name, conv, the BatchNorm right after it) for the 1x1 and depthwise convs of ``block``, in order."""
    modules = list(block.named_modules())
    targets = []
    for position, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        pointwise = module.groups == 1 and module.kernel_size == (1, 1) and module.stride == (1, 1)
        depthwise = 1 < module.groups == module.in_channels == module.out_channels
        if not (pointwise or depthwise):
            continue
        following = next((m for _, m in modules[position + 1:] if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))), None)
        bn = following if isinstance(following, nn.BatchNorm2d) and following.num_features == module.out_channels else None
        targets.append((name, module, bn))
    return targets


@torch.no_grad()
def _refit(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, hessian: torch.Tensor, cross: torch.Tensor,
           damping: float) -> None:
    original = torch.cat([conv.weight.flatten(1), torch.zeros(conv.out_channels, 1, dtype=conv.weight.dtype)], 1)
    if conv.bias is not None:
        original[:, -1] = conv.bias
    solved = ridge_solve(hessian, cross, original.double(), damping).to(conv.weight.dtype)
    conv.weight.copy_(solved[:, :-1].reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(solved[:, -1])
    elif bn is not None:
        bn.running_mean.sub_(solved[:, -1])  # BN(y + b) with mean m equals BN(y) with mean m - b
    else:
        # no place for a bias: solve again without the ones column
        cols = hessian.shape[-1] - 1
        solved = ridge_solve(hessian[..., :cols, :cols], cross[..., :cols, :], original[:, :-1].double(), damping)
        conv.weight.copy_(solved.to(conv.weight.dtype).reshape(conv.weight.shape))


@torch.no_grad()
def reconstruct_pruned(pruned: nn.Module, parent: nn.Module, images: torch.Tensor,
                       kept_outputs: Mapping[str, torch.Tensor], damping: float = DEFAULT_DAMPING) -> list[str]:
    """Re-solve (in place) ``pruned``'s 1x1 and depthwise trunk convs from the first pruned block on.

    ``kept_outputs`` maps the full names of convs whose output channels were cut to the parent's
    channel indices they kept. Both models are in eval mode with their BatchNorm layers. Returns the
    names of the re-solved convs, in forward order.
    """
    if not kept_outputs:
        return []
    first = min(int(name.split(".")[2]) for name in kept_outputs)
    pruned.eval()
    parent.eval()
    x = list(images.float().split(CHUNK))
    xp = list(x)
    refit = []
    blocks = zip(pruned.trunk.blocks, parent.trunk.blocks)
    for index, (block, parent_block) in enumerate(blocks):
        if index >= first:
            for name, conv, bn in _refit_targets(block):
                full = f"trunk.blocks.{index}.{name}"
                reference = parent_block.get_submodule(name)
                hessian, cross = accumulated_normal_equations(conv, reference, block, parent_block, x, xp,
                                                              kept_outputs.get(full), skip_single_pixel=True)
                if hessian is not None:
                    _refit(conv, bn, hessian, cross, damping)
                    refit.append(full)
        x, xp = [block(c) for c in x], [parent_block(c) for c in xp]
    log.info("re-solved %d pruned-trunk convolutions against the parent on %d images", len(refit), len(images))
    return refit
