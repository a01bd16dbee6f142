"""Fold BatchNorm into the convolution before it, for quantization and INT8 export.

Quantization (NNI PTQ/QAT), the Q/DQ ONNX and the TensorRT calibration cache all work on the
folded model, so a per-channel weight scale recorded for ``module.weight`` applies exactly to the
weight of the ONNX Conv that the exporter writes for that module.

Conv -> BatchNorm pairs are found on the ``torch.fx`` graph, not by module order, so a BN is only
folded when it really consumes that convolution's output and nothing else reads the raw output.
A plain ``nn.BatchNorm2d`` becomes ``nn.Identity``; a BatchNorm2d subclass that carries more than
the normalisation (e.g. timm's BatchNormAct2d, traced as ``F.batch_norm`` plus its activation)
keeps its place and is set to the exact identity (weight 1, bias 0, mean 0, var 1, eps 0), so
module names stay those of the original model either way.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from edge_tl.errors import ConfigError

logger = logging.getLogger(__name__)

def _bn_module_of_call(node: torch.fx.Node, model: nn.Module) -> str | None:
    """The module path of a BatchNorm applied by ``node``, or None if ``node`` is not one."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return str(node.target) if isinstance(module, nn.BatchNorm2d) else None
    if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
        mean_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
        if isinstance(mean_arg, torch.fx.Node) and mean_arg.op == "get_attr":
            path = str(mean_arg.target).rsplit(".", 1)[0]
            if isinstance(model.get_submodule(path), nn.BatchNorm2d):
                return path
    return None


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read the tensor's values (``getattr(x, "ndim")`` checks, as timm has, do not)."""
    return [
        user for user in node.users
        if not (user.op == "call_function" and user.target is getattr)
    ]


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, bn path) for every Conv2d whose output goes only into one eval-mode BatchNorm2d."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises TraceError, TypeError or NotImplementedError for dynamic code
        raise ConfigError(
            f"{type(model).__name__} is not torch.fx-traceable ({err}); BatchNorm folding needs a traceable model"
        ) from err
    # Look modules up in ``model``: the GraphModule keeps only the attributes the graph touches.
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(str(node.target)), nn.Conv2d):
            continue
        users = _value_users(node)
        if len(users) != 1:
            continue
        bn_path = _bn_module_of_call(users[0], model)
        if bn_path is None:
            continue
        bn = model.get_submodule(bn_path)
        bn_calls = calls.get(bn_path, 0) if users[0].op == "call_module" else 1
        if calls[str(node.target)] != 1 or bn_calls != 1:
            logger.info("not folding %s into %s: a module is called more than once", bn_path, node.target)
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            logger.info("not folding %s: it normalises with batch statistics", bn_path)
            continue
        pairs.append((str(node.target), bn_path))
    return pairs


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _neutralize(bn: nn.BatchNorm2d) -> None:
    """Make ``bn`` compute exactly ``x`` in eval mode: (x - 0) / sqrt(1 + 0) * 1 + 0."""
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    bn.eps = 0.0


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Conv2d -> BatchNorm2d pair folded into the Conv2d.

    The input model is not modified. Outputs equal the original's up to float rounding (~1e-6).
    """
    folded = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(folded)
    for conv_path, bn_path in pairs:
        conv = folded.get_submodule(conv_path)
        bn = folded.get_submodule(bn_path)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        new_conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        )
        with torch.no_grad():
            new_conv.weight.copy_(weight.detach())
            new_conv.bias.copy_(bias.detach())
        _set_submodule(folded, conv_path, new_conv.eval())
        if type(bn) is nn.BatchNorm2d:
            _set_submodule(folded, bn_path, nn.Identity())
        else:
            _neutralize(bn)
    logger.info("folded %d BatchNorm layers into convolutions", len(pairs))
    return folded
