"""NNI 3.0 quantizer targets: the config list for a quantization plan, and calibration tensors moved
out of and into NNI's target spaces.

Below both :mod:`edge_tl.quantize` (PTQ) and :mod:`edge_tl.qat` (QAT), which drive NNI's quantizers
with these; ``qat`` never imports ``quantize``, which imports ``qat`` only when QAT is asked for.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calibrate.calibration_file import CalibrationTensor
from edge_tl import nni_compat

NNI_TARGETS = {"input": "_input_0", "weight": "weight", "output": "_output_0"}
ROLES = {target: role for role, target in NNI_TARGETS.items()}
_ACTIVATION_SETTING = {"quant_dtype": "uint8", "quant_scheme": "affine"}
_WEIGHT_SETTING = {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}


def nni_config_list(plan: dict[str, tuple[str, ...]]) -> list[dict]:
    """NNI 3.0 config_list: uint8 affine per-tensor activations, int8 symmetric per-channel weights."""
    by_roles: dict[tuple[str, ...], list[str]] = {}
    for name, roles in plan.items():
        by_roles.setdefault(roles, []).append(name)
    configs = []
    for roles, names in by_roles.items():
        settings = {NNI_TARGETS[role]: dict(_WEIGHT_SETTING if role == "weight" else _ACTIVATION_SETTING)
                    for role in roles}
        # NNI's schema requires a top-level quant_dtype; target_settings override it per target.
        configs.append({"op_names": names, "target_names": list(settings), "target_settings": settings,
                        "quant_dtype": "int8"})
    return configs


@torch.no_grad()
def tensor_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Logits of ``model`` (eval mode) on a preprocessed image tensor, in batches."""
    model.eval()
    return torch.cat([model(chunk) for chunk in torch.split(images, batch_size)]).float().numpy()


def current_tensors(quantizer, plan) -> list[CalibrationTensor]:
    """Calibration entries (in plan order) for the current weights and NNI's current activation ranges."""
    tensors = []
    for module_name, target_name, space in nni_compat.quantization_targets(quantizer):
        role = ROLES[target_name]
        if role == "weight":
            tensors.append(CalibrationTensor.weight(module_name, space.target.detach().cpu().numpy()))
        else:
            low, high = float(space.tracked_min), float(space.tracked_max)
            tensors.append(CalibrationTensor.activation(module_name, role, low, high))
    order = {(name, role): index for index, (name, roles) in enumerate(plan.items()) for role in roles}
    rank = {"input": 0, "weight": 1, "output": 2}
    return sorted(tensors, key=lambda t: (order[(t.module, t.role)], rank[t.role]))


def apply_calibration(quantizer, tensors: list[CalibrationTensor], with_ranges: bool = False) -> None:
    """Write calibration scales/zero points (and, with ``with_ranges``, min/max) into NNI's target spaces."""
    by_key = {(t.module, NNI_TARGETS[t.role]): t for t in tensors}
    for module_name, target_name, space in nni_compat.quantization_targets(quantizer):
        tensor = by_key[(module_name, target_name)]
        ranges = (tensor.min, tensor.max) if with_ranges else (None, None)
        nni_compat.set_quantization_params(space, tensor.scale, tensor.zero_point, *ranges)
