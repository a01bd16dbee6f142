"""Backbone registry: real models, real ImageNet weights for efficientnet_lite0, real ONNX Runtime sessions."""
from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edge_tl.artifacts import save_weights
from edge_tl.backbones import (
    BackboneSpec,
    EdgeClassifier,
    build_model,
    build_reference_lite0,
    get_backbone,
    list_backbones,
    trunk_block_count,
)
from edge_tl.errors import BackendUnavailableError, ConfigError

REQUIRED = ["efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"]
# (feature_dim, trunk block count: stem + inverted-residual blocks + final conv)
EXPECTED_SHAPE = {
    "efficientnet_lite0": (1280, 18),
    "mobilenet_v2": (1280, 19),
    "mobilenet_v3_small": (576, 13),
    "mobilenet_v3_large": (960, 17),
    "efficientnet_b0": (1280, 18),
}
SMALL_PX = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0_imagenet() -> EdgeClassifier:
    return build_model("efficientnet_lite0", 1000, 224, pretrained=True, imagenet_head=True)


@pytest.fixture(scope="module")
def lite0_reference() -> nn.Module:
    return build_reference_lite0()


def _photo(name: str, spec: BackboneSpec, img_size: int) -> torch.Tensor:
    """A scikit-image sample photograph resized to img_size x img_size and normalised like the spec."""
    data = pytest.importorskip("skimage.data")
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[spec.interpolation]
    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((img_size, img_size), resample)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    return x.unsqueeze(0)


def _small_model(name: str) -> EdgeClassifier:
    torch.manual_seed(0)
    return build_model(name, 3, SMALL_PX, pretrained=(name == "efficientnet_lite0"))


def test_registry_has_required_backbones_with_lite0_default():
    assert set(REQUIRED) <= set(list_backbones())
    assert list_backbones()[0] == "efficientnet_lite0"
    lite0 = get_backbone("efficientnet_lite0")
    assert (lite0.mean, lite0.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert get_backbone("mobilenet_v2").mean == (0.485, 0.456, 0.406)
    for name in REQUIRED:
        spec = get_backbone(name)
        assert (spec.name, spec.default_img_size, spec.size_multiple, spec.min_img_size) == (name, 224, 32, 32)
        assert spec.feature_dim == EXPECTED_SHAPE[name][0]


@pytest.mark.parametrize("name", REQUIRED)
def test_structure_fx_trace_and_onnx_runtime_match(name):
    ort = pytest.importorskip("onnxruntime")
    model = _small_model(name)
    feature_dim, block_count = EXPECTED_SHAPE[name]
    x = torch.randn(2, 3, SMALL_PX, SMALL_PX, generator=torch.Generator().manual_seed(1))

    assert trunk_block_count(model) == block_count
    convs = [m for m in model.trunk.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 3 and convs[-1].out_channels == feature_dim and convs[-1].kernel_size == (1, 1)
    assert all(type(m) is nn.Conv2d for m in convs)  # no dynamic-padding subclasses left
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (feature_dim, 3)

    with torch.no_grad():
        features = model.trunk(x)
        eager = model(x)
        assert features.shape == (2, feature_dim)
        torch.testing.assert_close(model.trunk.pool(model.trunk.blocks(x)), features, rtol=0, atol=0)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), eager, rtol=0, atol=1e-6)

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": x.numpy()})
    assert np.abs(onnx_logits - eager.numpy()).max() < 1e-4


def test_lite0_static_padding_uses_plain_modules_only(lite0_imagenet):
    from timm.layers import BatchNormAct2d, Conv2dSame

    modules = list(lite0_imagenet.modules())
    assert not any(isinstance(m, (Conv2dSame, BatchNormAct2d, nn.ZeroPad2d)) for m in modules)
    assert all(type(m) is nn.BatchNorm2d and m.eps == 1e-3 for m in modules if isinstance(m, nn.BatchNorm2d))
    strided = [m for m in modules if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    # TF padding (0, 1) of 3x3 and (1, 2) of 5x5 strided convs folded into 4x4 and 6x6 kernels whose
    # leading row and column are zero: the stem and four strided depthwise convs
    assert [(m.kernel_size, m.padding) for m in strided] == [
        ((4, 4), (1, 1)), ((4, 4), (1, 1)), ((6, 6), (2, 2)), ((4, 4), (1, 1)), ((6, 6), (2, 2))]
    assert all(m.weight[:, :, 0].abs().sum() == 0 and m.weight[:, :, :, 0].abs().sum() == 0 for m in strided)


@pytest.mark.parametrize(("photo", "top1_classes"), [("chelsea", range(281, 286)), ("coffee", {967, 968})])
def test_lite0_imagenet_weights_recognise_sample_photos(lite0_imagenet, photo, top1_classes):
    x = _photo(photo, get_backbone("efficientnet_lite0"), 224)
    with torch.no_grad():
        probabilities = lite0_imagenet(x).softmax(dim=1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] in top1_classes
    assert probabilities[top5[0]] > 0.5
    if photo == "chelsea":  # tabby 281, tiger cat 282, Egyptian cat 285 all rank high
        assert len(set(top5) & set(range(281, 286))) >= 3


def test_lite0_static_padding_matches_dynamic_original_at_224(lite0_imagenet, lite0_reference):
    x = torch.cat([_photo("chelsea", get_backbone("efficientnet_lite0"), 224),
                   torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))])
    with torch.no_grad():
        static, dynamic = lite0_imagenet(x), lite0_reference(x)
    assert (static - dynamic).abs().max().item() < 1e-4
    assert static.argmax(1).tolist() == dynamic.argmax(1).tolist()


def test_lite0_static_padding_matches_dynamic_original_at_160(lite0_reference):
    model = build_model("efficientnet_lite0", 1000, 160, imagenet_head=True)
    x = _photo("coffee", get_backbone("efficientnet_lite0"), 160)
    with torch.no_grad():
        static, dynamic = model(x), lite0_reference(x)
        features = model.trunk(x)
        reference_features = lite0_reference.forward_head(lite0_reference.forward_features(x), pre_logits=True)
    assert (static - dynamic).abs().max().item() < 1e-4
    assert (features - reference_features).abs().max().item() < 1e-4


def test_new_head_is_fresh_linear_and_trunk_keeps_imagenet_weights(lite0_imagenet):
    model = build_model("efficientnet_lite0", 4, 224)
    assert (model.head.in_features, model.head.out_features) == (1280, 4)
    trunk_a, trunk_b = model.trunk.state_dict(), lite0_imagenet.trunk.state_dict()
    assert trunk_a.keys() == trunk_b.keys()
    assert all(torch.equal(trunk_a[k], trunk_b[k]) for k in trunk_a)


def test_unknown_backbone_is_config_error_listing_valid_names():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'") as info:
        get_backbone("resnet9000")
    assert all(name in str(info.value) for name in REQUIRED)
    with pytest.raises(ConfigError):
        build_model("resnet9000", 3, 224, pretrained=False)


@pytest.mark.parametrize("img_size", [0, 31, 100, 225, -32, 224.0, True, "224"])
def test_bad_image_size_is_config_error(img_size):
    spec = get_backbone("mobilenet_v2")
    with pytest.raises(ConfigError, match="multiple of 32 of at least 32"):
        spec.check_img_size(img_size)
    with pytest.raises(ConfigError, match="not valid for mobilenet_v2"):
        build_model(spec, 3, img_size, pretrained=False)


def test_valid_image_sizes_pass():
    spec = get_backbone("efficientnet_lite0")
    assert [spec.check_img_size(s) for s in (32, 96, 224, 256)] == [32, 96, 224, 256]


def test_contradictory_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="contradicts --no-pretrained"):
        build_model("mobilenet_v2", 3, 64, pretrained=False, weights=tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mobilenet_v2", 1, 64, pretrained=False)
    with pytest.raises(ConfigError, match="imagenet_head"):
        build_model("mobilenet_v2", 3, 64, pretrained=True, imagenet_head=True)
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("mobilenet_v2", 3, 64, weights=tmp_path / "missing.safetensors")


@pytest.fixture
def empty_torch_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and any download attempt turned into a test failure."""
    hub = tmp_path / "torch" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))  # what torch.hub.set_dir sets; restored after

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    return hub


def test_missing_pretrained_weights_is_clear_error_without_download(empty_torch_hub):
    with pytest.raises(BackendUnavailableError) as info:
        build_model("mobilenet_v2", 3, 224, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert str(empty_torch_hub / "checkpoints" / "mobilenet_v2-7ebf99e0.pth") in message
    assert "pass --weights FILE or --no-pretrained" in message


def test_pretrained_weights_from_torch_cache(empty_torch_hub):
    import torchvision

    source = torchvision.models.mobilenet_v3_small(weights=None)
    (empty_torch_hub / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), empty_torch_hub / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    model = build_model("mobilenet_v3_small", 3, 64, pretrained=True)
    torch.testing.assert_close(model.trunk.blocks[0][0].weight, source.features[0][0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.trunk.blocks[-1][1].running_var, source.features[-1][1].running_var, rtol=0, atol=0)


def test_pretrained_weights_from_safetensors_file(tmp_path, empty_torch_hub):
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.efficientnet_b0(weights=None).eval()
    with torch.no_grad():
        source.features[1][0].block[0][1].running_mean.uniform_(-1, 1)
    path = save_weights(tmp_path / "efficientnet_b0.safetensors", source.state_dict())
    model = build_model("efficientnet_b0", 5, 64, pretrained=True, weights=path)
    # efficientnet stages are flattened: features[1][0] is trunk block 1
    torch.testing.assert_close(model.trunk.blocks[1].block[0][1].running_mean,
                               source.features[1][0].block[0][1].running_mean, rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(source.avgpool(source.features(x)), 1)
        torch.testing.assert_close(model.trunk(x), expected, rtol=0, atol=1e-6)

    with pytest.raises(ConfigError, match="does not match mobilenet_v2"):
        build_model("mobilenet_v2", 5, 64, pretrained=True, weights=path)


def test_imagenet_head_keeps_torchvision_classifier(tmp_path, empty_torch_hub):
    import torchvision

    source = torchvision.models.mobilenet_v2(weights=None).eval()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(source.state_dict(), path)
    model = build_model("mobilenet_v2", 1000, 64, weights=path, imagenet_head=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)
    v3_path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), v3_path)
    with pytest.raises(ConfigError, match="not a single Linear"):
        build_model("mobilenet_v3_small", 1000, 64, weights=v3_path, imagenet_head=True)
