"""PTQ weight reconstruction: each quantized convolution re-solved against the float model.

Round-to-nearest INT8 leaves every convolution a few percent off the float one and the errors add
up through the trunk (efficientnet_lite0 fine-tuned on magnetic-tile: 26% relative error in the
pooled features of the Q/DQ ONNX, 95.5% top-1 agreement with float). Here, block by block
through ``model.trunk.blocks``, every convolution with a ``:weight`` calibration entry gets

1. the least-squares weights and bias that map its *quantized* input (the blocks before it already
   reconstructed, the activations fake-quantized where the Q/DQ ONNX quantizes them) onto the
   *float* model's output, ridge-damped toward its original weights, so the upstream error is
   corrected too, not only this layer's rounding; then
2. GPTQ rounding (Frantar et al., 2022): input columns rounded one at a time to the per-output-
   channel symmetric int8 grid, each rounding error pushed through the inverse input Hessian
   onto the columns not rounded yet and, last, onto the float bias.

Depthwise convolutions are solved per channel (its k x k taps and bias). The rounded weights lie
exactly on their grids (weight = q * scale), so the export reproduces them bit for bit; the scales
go into calibration.json (a channel whose largest weight moved below 127 steps keeps its grid).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibrate.calibration_file import CalibrationTensor
from calibrate.ranges import asymmetric_uint8
from edge_tl.backbones import ResidualBlock

log = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01  # ridge toward the original weights, relative to the mean input energy
GPTQ_DAMPING = 0.01  # Hessian damping for the rounding order (as in GPTQ)
CHUNK = 8  # images per forward pass: a depthwise layer at 112 px unfolds to ~0.7 GB per 8 images
ACTIVATION_BOUNDS = {nn.ReLU6: (0.0, 6.0), nn.ReLU: (0.0, float("inf"))}


class _Stop(Exception):
    """Ends a forward pass once the tensor wanted has been seen."""


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, low: int = 0, high: int = 255) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, low, high) - zero_point) * scale


def _next_activation(model: nn.Module, name: str) -> type | None:
    """The activation that follows module ``name`` in its parent Sequential (BN folded to Identity)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    children = list(parent.named_children())
    index = [n for n, _ in children].index(child)
    for _, module in children[index + 1:]:
        if not isinstance(module, nn.Identity):
            return type(module) if type(module) in ACTIVATION_BOUNDS else None
    return None


def simulate_qdq(model: nn.Module, tensors: Iterable[CalibrationTensor]) -> Callable[[], None]:
    """Fake-quantize ``model``'s activations where the Q/DQ ONNX does (export/qdq.py); returns remove().

    Convolution inputs and recorded outputs (an output followed by ReLU/ReLU6 within that
    activation's bounds, as ONNX Runtime quantizes it after the activation), and the input of every
    residual block, which the skip connection reads already quantized. Weights are not touched.
    """
    entries = {(t.module, t.role): t for t in tensors}
    handles = []

    def quantizer(entry: CalibrationTensor, bounds=(-np.inf, np.inf)):
        low, high = max(entry.min, bounds[0]), min(entry.max, bounds[1])
        scale, zero_point = (entry.scale, entry.zero_point) if (low, high) == (entry.min, entry.max) \
            else asymmetric_uint8(low, high)
        return lambda x: fake_quantize(x, scale, zero_point)

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if (name, "input") in entries:
                q = quantizer(entries[(name, "input")])
                handles.append(module.register_forward_pre_hook(lambda m, args, q=q: (q(args[0]),)))
            if (name, "output") in entries:
                activation = _next_activation(model, name)
                q = quantizer(entries[(name, "output")], ACTIVATION_BOUNDS.get(activation, (-np.inf, np.inf)))
                handles.append(module.register_forward_hook(lambda m, args, out, q=q: q(out)))
        elif isinstance(module, ResidualBlock) and module.use_skip:
            first = next((f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
            if first is not None and (first, "input") in entries:
                q = quantizer(entries[(first, "input")])
                handles.append(module.register_forward_pre_hook(lambda m, args, q=q: (q(args[0]),)))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


@torch.no_grad()
def captured(block: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``module``'s input (after its pre-hooks) or output when ``block`` runs on ``x``."""
    seen = []

    def hook(m, args, out):
        seen.append(args[0] if what == "input" else out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        block(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Dense conv inputs as rows of (C_in * k * k) columns plus a ones column for the bias."""
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        a = x.flatten(2)
    else:
        a = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    a = a.transpose(1, 2).reshape(-1, a.shape[1])
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)


def _depthwise_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Depthwise conv inputs per channel: (C, rows, k*k + 1), the last column ones."""
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    a = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    a = a.view(a.shape[0], conv.out_channels, taps, -1).permute(1, 0, 3, 2).reshape(conv.out_channels, -1, taps)
    return torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)


def gptq_round(weights: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round all but the last column of ``weights`` (rows x cols, batched over a leading axis or not)
    to ``scales``' int8 grids, compensating each rounding error on the later columns (GPTQ)."""
    weights = weights.clone()
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    damp = GPTQ_DAMPING * torch.diagonal(hessian, dim1=-2, dim2=-1).mean(-1)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian + damp[..., None, None] * eye))
    upper = torch.linalg.cholesky(inverse, upper=True)
    for i in range(weights.shape[-1] - 1):
        column = weights[..., i]
        rounded = torch.clamp(torch.round(column / scales), -127, 127) * scales
        error = (column - rounded) / upper[..., i:i + 1, i]
        weights[..., i] = rounded
        weights[..., i + 1:] -= error[..., None] * upper[..., i:i + 1, i + 1:]
    return weights


def normal_equations(conv: nn.Conv2d, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T A and A^T Y (float64) for fitting ``conv``'s weights and a bias so that input ``x`` gives
    output ``target``: dense (cols x cols, cols x outputs) or, for a depthwise conv, per channel
    (C x taps+1 x taps+1, C x taps+1 x 1). Sums over chunks of images add up."""
    if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
        a = _depthwise_columns(conv, x)
        y = target.transpose(0, 1).reshape(conv.out_channels, -1, 1)
        return (a.transpose(1, 2) @ a).double(), (a.transpose(1, 2) @ y).double()
    a = _columns(conv, x)
    y = target.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    return (a.T @ a).double(), (a.T @ y).double()


def accumulated_normal_equations(conv: nn.Conv2d, reference: nn.Conv2d, block: nn.Module, reference_block: nn.Module,
                                 inputs: list[torch.Tensor], reference_inputs: list[torch.Tensor],
                                 output_index: torch.Tensor | None = None, skip_single_pixel: bool = False):
    """:func:`normal_equations` summed over chunks of images: ``conv``'s input when ``block`` runs on each
    chunk of ``inputs``, against ``reference``'s output (its channels ``output_index``, or all) when
    ``reference_block`` runs on the matching chunk of ``reference_inputs``. With ``skip_single_pixel``,
    (None, None) for a conv that sees one pixel per image (squeeze-excitation): nothing to fit."""
    hessian = cross = None
    for x, xf in zip(inputs, reference_inputs):
        conv_input = captured(block, conv, x, "input")
        if skip_single_pixel and conv_input.shape[-1] * conv_input.shape[-2] == 1:
            return None, None
        target = captured(reference_block, reference, xf, "output")
        h, b = normal_equations(conv, conv_input, target if output_index is None else target[:, output_index])
        hessian, cross = (h, b) if hessian is None else (hessian + h, cross + b)
    return hessian, cross


def ridge_solve(hessian: torch.Tensor, cross: torch.Tensor, original: torch.Tensor, damping: float) -> torch.Tensor:
    """Ridge least squares toward ``original`` (outputs x cols, weights then bias, as
    :func:`normal_equations` orders them): W^T = (H + d I)^-1 (A^T Y + d W0^T), d relative to mean(diag H).
    For per-channel (depthwise) normal equations the result is solved channel by channel."""
    per_channel = hessian.dim() == 3
    if per_channel:
        original = original[:, None, :]
    d = damping * torch.diagonal(hessian, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    solved = torch.linalg.solve(hessian + d * eye, cross + d * original.transpose(-1, -2)).transpose(-1, -2)
    return solved[:, 0, :] if per_channel else solved


def _reconstruct_conv(conv: nn.Conv2d, reference: nn.Conv2d, block: nn.Module, reference_block: nn.Module,
                      inputs: list[torch.Tensor], reference_inputs: list[torch.Tensor], damping: float) -> torch.Tensor:
    """New int8-grid weights and bias for ``conv`` (in place); returns the per-channel scales."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    original = torch.cat([conv.weight.detach().flatten(1), conv.bias.detach()[:, None]], 1).double()
    hessian, cross = accumulated_normal_equations(conv, reference, block, reference_block, inputs, reference_inputs)
    solved = ridge_solve(hessian, cross, original, damping)
    floor = original[:, :-1].abs().amax(1) / 127
    scales = solved[:, :-1].abs().amax(1) / 127
    dead = scales < 1e-3 * floor  # a channel that never fires: keep its weights
    solved[dead], scales = original[dead], torch.where(dead, floor, scales).clamp_min(1e-12)
    if depthwise:
        rounded = gptq_round(solved[:, None, :], hessian, scales[:, None])[:, 0, :]
    else:
        rounded = gptq_round(solved, hessian, scales)
    conv.weight.data = rounded[:, :-1].reshape(conv.weight.shape).to(conv.weight.dtype)
    conv.bias.data = rounded[:, -1].to(conv.bias.dtype)
    return scales.float()


def reconstruct_weights(model: nn.Module, tensors: Iterable[CalibrationTensor], images: Iterable[np.ndarray],
                        damping: float = DEFAULT_DAMPING) -> list[CalibrationTensor]:
    """Reconstruct every convolution of ``model`` (BN-folded, plain modules) that ``tensors`` quantize.

    ``images`` are calibration batches (model input, NCHW float32). ``model`` is changed in place;
    returns ``tensors`` with the weight entries of the reconstructed layers replaced (their scales
    are the grids the new weights lie on).
    """
    tensors = list(tensors)
    quantized = {t.module for t in tensors if t.role == "weight"}
    reference = copy.deepcopy(model).eval()
    model.eval()
    batches = [torch.from_numpy(np.ascontiguousarray(b)) for b in images]
    x = [chunk for b in batches for chunk in torch.split(b, CHUNK)]
    xf = list(x)
    remove = simulate_qdq(model, tensors)
    scales: dict[str, torch.Tensor] = {}
    try:
        blocks, reference_blocks = model.trunk.blocks, reference.trunk.blocks
        for index, (block, reference_block) in enumerate(zip(blocks, reference_blocks)):
            for name, conv in block.named_modules():
                full = f"trunk.blocks.{index}.{name}" if name else f"trunk.blocks.{index}"
                if isinstance(conv, nn.Conv2d) and full in quantized and conv.bias is not None and (
                        conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels):
                    scales[full] = _reconstruct_conv(conv, reference_block.get_submodule(name), block,
                                                     reference_block, x, xf, damping)
            with torch.no_grad():
                x, xf = [block(c) for c in x], [reference_block(c) for c in xf]
    finally:
        remove()
    log.info("reconstructed %d convolutions on %d calibration images", len(scales), sum(len(c) for c in x))
    return [CalibrationTensor.weight(t.module, model.get_submodule(t.module).weight.detach().numpy(),
                                     scales[t.module].numpy())
            if t.role == "weight" and t.module in scales else t for t in tensors]

