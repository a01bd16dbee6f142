"""Which tensors of a BN-folded model are quantized, and a forward-hook calibrator for them.

:func:`quantization_plan` is the rule the NNI quantizer (:mod:`edge_tl.quantize`) follows: every
Conv2d/Linear gets its input and weight quantized, and its output too unless the only consumer
re-quantizes it. Modules named in ``float_modules`` (normally :func:`output_layers`, the
classifier head, and :func:`input_layers`, the stem) are left out entirely: calibration.json then
has no entry for them and the Q/DQ export keeps them float (calibrate/FORMAT.md).

:func:`collect_calibration` is a plain-PyTorch calibrator (no NNI) over a calibration source: the
reference the NNI quantizer's ranges can be checked against, and a quick way to make a
calibration.json for tests and benchmarks. Give it the BN-folded model
(:func:`edge_tl.fold.fold_batchnorm`), as calibration.json names modules of that model.
"""
from __future__ import annotations

import logging
from typing import Any, Collection, Mapping

import torch
import torch.fx
from torch import nn

from calibrate.calibration_file import Calibration, CalibrationTensor
from calibrate.ranges import DEFAULT_PERCENTILE, RangeObserver, check_range_method
from calibrate.sources import CalibrationSource, iter_batches
from edge_tl.errors import ConfigError

logger = logging.getLogger(__name__)

OBSERVED_MODULES = (nn.Conv2d, nn.Linear)
ABSORBED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _module_nodes(graph: torch.fx.Graph, model: nn.Module):
    return [node for node in graph.nodes
            if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), OBSERVED_MODULES)]


def output_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the Conv2d/Linear modules whose output is the model's output: an EdgeClassifier's ``head``."""
    graph = torch.fx.symbolic_trace(model).graph
    return tuple(str(node.target) for node in _module_nodes(graph, model)
                 if any(user.op == "output" for user in node.users))


def input_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the Conv2d/Linear modules that read the model's input: an EdgeClassifier's stem."""
    graph = torch.fx.symbolic_trace(model).graph
    return tuple(str(node.target) for node in _module_nodes(graph, model)
                 if any(arg.op == "placeholder" for arg in node.all_input_nodes))


def _output_absorbed(node: torch.fx.Node, model: nn.Module, float_modules: Collection[str]) -> bool:
    """True when ``node``'s output reaches one quantized module through Identity and <= 1 ReLU/ReLU6."""
    activations = 0
    while True:
        users = [user for user in node.users if not (user.op == "call_function" and user.target is getattr)]
        if len(users) != 1 or users[0].op != "call_module":
            return False
        node = users[0]
        module = model.get_submodule(str(node.target))
        if isinstance(module, OBSERVED_MODULES):
            return str(node.target) not in float_modules
        if isinstance(module, ABSORBED_ACTIVATIONS):
            activations += 1
        elif not isinstance(module, nn.Identity):
            return False
        if activations > 1:
            return False


def quantization_plan(folded: nn.Module, float_modules: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
    """Module name -> quantized roles (``input``, ``weight`` and maybe ``output``), in graph order.

    Every Conv2d/Linear not in ``float_modules`` is planned. Its output is quantized unless it
    reaches exactly one planned Conv2d/Linear through nothing but Identity (a folded BatchNorm) and
    at most one ReLU/ReLU6: there the consumer's ``:input`` range is the one a Q/DQ graph needs
    after the activation (ONNX Runtime drops a Relu/Clip into the quantization that follows it).
    """
    graph = torch.fx.symbolic_trace(folded).graph
    plan = {}
    for node in _module_nodes(graph, folded):
        name = str(node.target)
        if name in plan:
            raise ConfigError(f"module {name} is called more than once; "
                              "edge-tl cannot quantize a layer shared by several calls")
        if name not in float_modules:
            absorbed = _output_absorbed(node, folded, float_modules)
            plan[name] = ("input", "weight") if absorbed else ("input", "weight", "output")
    return plan


def observe_activations(model: nn.Module, source: CalibrationSource, num_bins: int = 2048) -> dict[tuple[str, str], RangeObserver]:
    """{(module, "input"|"output"): RangeObserver} over every batch of ``source``."""
    observers: dict[tuple[str, str], RangeObserver] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            for role, tensor in (("input", args[0]), ("output", output)):
                observer = observers.setdefault((name, role), RangeObserver(num_bins=num_bins))
                observer.update(tensor.detach().float().cpu().numpy())

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, OBSERVED_MODULES)
    ]
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in iter_batches(source):
                model(torch.from_numpy(batch))
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    logger.info("observed %d tensors over %d calibration batches", len(observers), batches)
    return observers


def collect_calibration(
    model: nn.Module,
    source: CalibrationSource,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    model_info: Mapping[str, Any] | None = None,
    calibration_files_hash: str = "",
    float_modules: Collection[str] = (),
) -> Calibration:
    """A Calibration of ``model`` (BN-folded): uint8 activations by ``method``, int8 per-channel weights.

    Every Conv2d/Linear input and output is recorded, except for ``float_modules``, which get no
    entry at all (and are listed under ``model["float_modules"]``) so the export keeps them float.
    """
    check_range_method(method, percentile)
    observers = observe_activations(model, source)
    tensors = []
    for name, module in model.named_modules():
        if not isinstance(module, OBSERVED_MODULES) or name in float_modules:
            continue
        for role in ("input", "output"):
            observer = observers.get((name, role))
            if observer is not None:
                low, high = observer.compute(method, percentile)
                observed = {} if method == "minmax" else {
                    "observed_min": observer.min_value, "observed_max": observer.max_value}
                tensors.append(CalibrationTensor.activation(name, role, low, high, **observed))
        tensors.append(CalibrationTensor.weight(name, module.weight.detach().cpu().numpy()))
    info = {"input_name": getattr(source, "input_name", "input"), **dict(model_info or {}),
            "float_modules": sorted(float_modules)}
    return Calibration(info, method, calibration_files_hash, tuple(tensors))
