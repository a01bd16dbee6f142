"""NNI 3.0 entry points edge-tl uses, with the version quirks worked around in one place.

Only ``edge_tl.prune`` imports this module. Each workaround says why it exists, so it can be
dropped when NNI fixes the behaviour.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

# NNI 3.0 registers torch.fx's immutable_dict/immutable_list as pytree nodes with a private torch
# API that torch has deprecated, and torch warns that they are already registered. Both are
# harmless (the registrations are equivalent); silence exactly these at import time so code that
# runs with warnings as errors can import NNI.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch.utils._pytree._register_pytree_node` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"<class 'torch.fx.immutable_collections.immutable_(dict|list)'> is already registered", category=UserWarning)
    import nni
    from nni.compression.pruning import FPGMPruner, L1NormPruner, L2NormPruner, TaylorPruner
    from nni.compression.speedup import ModelSpeedup
    # NNI 3.0 exports no public function for its channel-dependency analysis; ModelSpeedup uses this
    # one internally to decide which layers must share a channel mask, so edge-tl asks the same one.
    from nni.compression.speedup.dependency import build_channel_dependency, find_adjacent_layers
    from nni.compression.utils import TorchEvaluator

log = logging.getLogger(__name__)

NORM_PRUNERS = {"l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner}


@contextlib.contextmanager
def quiet_nni() -> Iterator[None]:
    """Route NNI's console chatter to debug logging for the duration of the block.

    NNI 3.0 attaches a stdout handler at INFO level to the ``nni`` logger (one line per replaced
    module during speedup) and ``fix_channel_mask_conflict`` calls ``print`` directly. Both would
    interleave with the CLI's output; the level is restored afterwards.
    """
    nni_logger = logging.getLogger("nni")
    previous = nni_logger.level
    nni_logger.setLevel(logging.WARNING)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            yield
    finally:
        nni_logger.setLevel(previous)
        if stdout.getvalue().strip():
            log.debug("NNI printed: %s", " | ".join(stdout.getvalue().split("\n")).strip(" |"))


def channel_dependency_sets(graph_module: torch.fx.GraphModule) -> list[set[str]]:
    """Module names that must share output-channel masks, as ModelSpeedup will enforce them.

    The graph must carry shapes (``ShapeProp``): NNI reads ``tensor_meta`` to decide where a
    dependency stops.
    """
    return [{node.target for node in group} for group in build_channel_dependency(graph_module)]


def parent_layer_names(graph_module: torch.fx.GraphModule, module_name: str) -> list[str]:
    """Names of the nearest Conv2d/Linear layers feeding ``module_name`` (through BN, activations, padding)."""
    node = next(n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == module_name)
    return [parent.target for parent in find_adjacent_layers(node, graph_module, [nn.Conv2d, nn.Linear], "parent")]


def _plain_masks(masks: dict) -> dict[str, dict[str, torch.Tensor]]:
    # NNI 3.0 returns a defaultdict with ``None`` for targets it did not mask (e.g. a conv without
    # bias); ModelSpeedup accepts them but downstream code should not have to.
    return {name: {key: value for key, value in targets.items() if value is not None} for name, targets in masks.items()}


def norm_pruner_masks(method: str, model: nn.Module, config_list: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Masks from NNI's weight-based pruners (``l1``, ``l2``, ``fpgm``); ``model`` is left unwrapped."""
    pruner = NORM_PRUNERS[method](model, config_list)
    with quiet_nni():
        _, masks = pruner.compress()
        pruner.unwrap_model()
    return _plain_masks(masks)


def taylor_pruner_masks(
    model: nn.Module,
    config_list: list[dict],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """Masks from NNI's TaylorPruner, accumulating (weight * gradient)^2 over ``batches``.

    TaylorPruner only generates masks from inside an optimizer step, so it needs a TorchEvaluator
    with an ``nni.trace``d optimizer. The optimizer is SGD with lr=0: the steps collect gradients
    without changing any weight. The model stays in eval mode (frozen BatchNorm statistics).
    """

    def training_step(batch, net):
        inputs, labels = batch
        return loss_fn(net(inputs), labels)

    def training_func(net, optimizers, step_fn, lr_schedulers=None, max_steps=None, max_epochs=None):
        net.eval()
        for index, batch in enumerate(batches):
            if max_steps is not None and index >= max_steps:
                break
            optimizers.zero_grad()
            step_fn(batch, net).backward()
            optimizers.step()

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    evaluator = TorchEvaluator(training_func, optimizer, training_step)
    pruner = TaylorPruner(model, config_list, evaluator, training_steps=len(batches))
    with quiet_nni():
        _, masks = pruner.compress()
        pruner.unwrap_model()
    model.zero_grad(set_to_none=True)
    return _plain_masks(masks)


def speedup(model: nn.Module, dummy_input: torch.Tensor, masks: dict) -> nn.Module:
    """Physically remove masked channels from ``model`` (in place) with NNI ModelSpeedup.

    NNI 3.0's default ``concrete_trace`` fails under torch 2.x (AttributeError inside the tracer,
    even on torchvision's mobilenet_v2); edge-tl models are ``torch.fx.symbolic_trace``-able by
    contract, so ModelSpeedup gets that graph. Without an explicit logger ModelSpeedup forces its logger to INFO.
    """
    speedup_log = logging.getLogger(f"{__name__}.speedup")
    graph_module = torch.fx.symbolic_trace(model)
    with quiet_nni():
        ModelSpeedup(model, dummy_input, masks, graph_module=graph_module, logger=speedup_log).speedup_model()
    return model

