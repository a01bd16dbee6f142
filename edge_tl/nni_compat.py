"""NNI 3.0 entry points edge-tl uses, with the version quirks worked around in one place.

``edge_tl.prune`` and ``edge_tl.quantize`` reach NNI only through this module. Each workaround
says why it exists, so it can be dropped when NNI fixes the behaviour.
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


def adjacent_layer_names(graph_module: torch.fx.GraphModule, module_name: str, direction: str = "parent") -> list[str]:
    """Names of the nearest Conv2d/Linear layers feeding (``parent``) or reading (``child``) ``module_name``.

    The search walks through layers that keep the channel count (BN, activations, padding, SE scaling).
    """
    node = next(n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == module_name)
    return [layer.target for layer in find_adjacent_layers(node, graph_module, [nn.Conv2d, nn.Linear], direction)]


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


class _DebugLogger(logging.LoggerAdapter):
    def info(self, msg, *args, **kwargs):
        self.debug(msg, *args, **kwargs)


SPEEDUP_BATCH = 32  # random inputs ModelSpeedup's mask inference sees (NNI's default: 8)
SPEEDUP_SEED = 0


def speedup(model: nn.Module, dummy_input: torch.Tensor, masks: dict) -> nn.Module:
    """Physically remove masked channels from ``model`` (in place) with NNI ModelSpeedup.

    NNI 3.0's default ``concrete_trace`` fails under torch 2.x (AttributeError inside the tracer,
    even on torchvision's mobilenet_v2); edge-tl models are ``torch.fx.symbolic_trace``-able by
    contract, so ModelSpeedup gets that graph. Without an explicit logger ModelSpeedup forces its logger to INFO.

    Every layer of a channel-dependency set (``channel_dependency_sets``) needs the same mask: a mask
    on an expansion conv alone is OR-merged with its unmasked depthwise conv by
    ``fix_channel_mask_conflict`` and nothing is pruned (NNI only logs "nothing masked").

    ModelSpeedup replaces ``dummy_input`` by a batch of ``torch.rand`` drawn from the global generator
    and also removes every channel whose output does not vary over that batch (std < 1e-6). With
    NNI's 8 inputs a live channel now and then reads constant, and one channel more than planned
    goes (``prune._check_pruned`` rejects that): here the batch is SPEEDUP_BATCH inputs, drawn from
    a generator seeded with SPEEDUP_SEED, so the same model is always pruned the same way, and the
    caller's random stream is left as it was.
    """
    # ModelSpeedup logs every node at INFO level (hundreds of lines per model): demote them to DEBUG
    speedup_log = _DebugLogger(logging.getLogger(f"{__name__}.speedup"), {})
    training = model.training
    graph_module = torch.fx.symbolic_trace(model)
    # A new GraphModule is in training mode, and speedup_model() ends with
    # graph_module.train(graph_module.training), which would put the shared submodules (BatchNorm
    # included) into training mode: give the graph the model's mode and restore it afterwards.
    graph_module.train(training)
    try:
        with quiet_nni(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(SPEEDUP_SEED)
            ModelSpeedup(model, dummy_input, masks, batch_size=SPEEDUP_BATCH, graph_module=graph_module,
                         logger=speedup_log).speedup_model()
    finally:
        model.train(training)
    return model


# =================================================================================================
# Quantization helpers (used by edge_tl.quantize, which imports NNI's PtqQuantizer/QATQuantizer
# itself, after this module has imported NNI with the warnings above filtered). Everything below
# works on a quantizer's wrappers and target spaces, which NNI 3.0 exposes only as private
# attributes (``_module_wrappers``, ``_target_spaces``, ``ModuleWrapper._track_funcs``).
# =================================================================================================


from nni.compression.base.wrapper import ModuleWrapper  # noqa: E402  (NNI already imported above)


def traced_optimizer(optimizer_cls: type, params, **kwargs) -> torch.optim.Optimizer:
    """An ``nni.trace``d optimizer: TorchEvaluator asserts traceable optimizers even for PTQ,
    which never steps one, and rebuilds it for the wrapped model from the recorded arguments."""
    return nni.trace(optimizer_cls)(params, **kwargs)


def quantization_targets(quantizer) -> Iterator[tuple[str, str, object]]:
    """(module name, NNI target name, target space) for every quantized tensor of ``quantizer``."""
    for module_name, spaces in quantizer._target_spaces.items():
        for target_name, space in spaces.items():
            yield module_name, target_name, space


def add_track_callback(quantizer, callback: Callable[[str, str, torch.Tensor], None]) -> Callable[[], None]:
    """Call ``callback(module_name, target_name, tensor)`` for every quantized tensor NNI tracks.

    The callback sees exactly the tensors NNI's own min/max tracking sees (module inputs/outputs
    before fake quantization, and weights). Returns a function that unregisters it: NNI has no API
    for removing a track function.
    """
    def track(wrapper, target_name: str, target) -> None:
        if target_name in wrapper.quantization_target_spaces and isinstance(target, torch.Tensor):
            callback(wrapper.name, target_name, target.detach())

    wrappers = [quantizer._module_wrappers[name] for name in quantizer._target_spaces]
    for wrapper in wrappers:
        wrapper.register_track_func(track)

    def remove() -> None:
        for wrapper in wrappers:
            if track in wrapper._track_funcs:
                wrapper._track_funcs.remove(track)

    return remove


def stop_ptq_tracking(quantizer) -> None:
    """Stop PtqQuantizer's min/max tracking after calibration.

    NNI 3.0 leaves ``track_min_max_val`` registered after ``compress()``, so every later forward
    pass (e.g. evaluating the fake-quantized model on validation images) would keep widening the
    tracked ranges, and spend an amin/amax per tensor doing so.
    """
    for name in quantizer._target_spaces:
        funcs = quantizer._module_wrappers[name]._track_funcs
        funcs[:] = [f for f in funcs if getattr(f, "__func__", None) is not type(quantizer).track_min_max_val]


def set_quantization_params(space, scale, zero_point, tracked_min=None, tracked_max=None) -> None:
    """Write scale/zero point (and optionally the tracked range) into an NNI target space.

    Values are per-tensor scalars or per-output-channel sequences; they are shaped as NNI keeps
    them (0-d for per-tensor, ``(C, 1, ...)`` for a weight with ``granularity='out_channel'``) and
    stored as float32 on the module's device. NNI's own formulas differ from calibrate/FORMAT.md
    at the edges (scale floor ``eps`` instead of ``1/255``, no float32 rounding step), so
    edge-tl computes the numbers and NNI only applies them.
    """
    wrapper = space._wrapper
    device = next(iter(wrapper.parameters()), torch.zeros(0)).device

    def shaped(values) -> torch.Tensor:
        tensor = torch.as_tensor(values, dtype=torch.float32, device=device)
        if tensor.dim() == 0:
            return tensor
        target = space.target  # weights: the parameter the channels belong to
        return tensor.reshape([tensor.numel()] + [1] * (target.dim() - 1))

    if tracked_min is not None:
        space.tracked_min, space.tracked_max = shaped(tracked_min), shaped(tracked_max)
    space.scale, space.zero_point = shaped(scale), shaped(zero_point)


def sync_weight_targets(quantizer, model: nn.Module) -> None:
    """Copy ``model``'s current (unwrapped) weight parameters into the quantizer's weight target spaces.

    NNI 3.0 keeps each quantized parameter in its target space; ``wrap()`` replaces the module's
    parameter with a clone of that stored tensor, so weights changed while unwrapped (PTQ weight
    reconstruction) would silently revert on the next ``wrap_model()`` without this.
    """
    for module_name, target_name, space in quantization_targets(quantizer):
        if target_name == "weight":
            space.target.data.copy_(model.get_submodule(module_name).weight.detach())


@contextlib.contextmanager
def quiet_qat_backward() -> Iterator[None]:
    """NNI 3.0's QATClampRound.backward reads ``ctx.saved_variables``, which torch deprecates with a
    DeprecationWarning on every backward pass; silence exactly that one while QAT trains."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"'saved_variables' is deprecated", category=DeprecationWarning)
        yield


def train_wrappers_only(model: nn.Module) -> None:
    """Put ``model`` in eval mode except NNI's wrappers.

    QATQuantizer tracks ranges and updates scales only while a wrapper is in training mode, but
    the model itself must keep eval behaviour during QAT: BatchNorm is folded (or neutralised and
    must not normalise with batch statistics) and dropout or stochastic depth would only add noise.
    Wrappers are children of the modules they wrap (attribute ``_nni_wrapper``).
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, ModuleWrapper):
            module.training = True
