"""Where frozen-trunk passes run: device names, the CPU fallback, a clear error without a GPU, and
(on a machine with a CUDA GPU) the same features and run from the GPU as from the CPU."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from edge_tl.backbones import build_model, get_backbone
from edge_tl.cli import main
from edge_tl.data import scan_image_folder
from edge_tl.device import CPU, placed, resolve_device
from edge_tl.errors import BackendUnavailableError, ConfigError
from edge_tl.finetune import FinetuneConfig, cache_features, finetune

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible to PyTorch")
IMG = 64


def test_device_names_resolve_and_unknown_names_are_config_errors():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ConfigError, match="'gpu' is not one of auto, cpu, cuda"):
        resolve_device("gpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_one_line_error_before_any_run_directory(surface_dataset, tmp_path, capsys):
    with pytest.raises(BackendUnavailableError, match="PyTorch sees no CUDA GPU"):
        resolve_device("cuda")
    out = tmp_path / "run"
    code = main(["finetune", str(surface_dataset), "--out", str(out), "--img-size", str(IMG), "--device", "cuda"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "--device cuda" in err[0] and "--device cpu" in err[0]
    assert not out.exists()


def test_placed_leaves_the_cpu_untouched_and_brings_a_module_back():
    layer = torch.nn.Linear(3, 2)
    with placed(layer, CPU) as inside:
        assert inside is layer and layer.weight.device.type == "cpu"
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="boom"), placed(layer, resolve_device("cuda")):
            assert layer.weight.device.type == "cuda"
            raise RuntimeError("boom")
    assert layer.weight.device.type == "cpu"


@needs_cuda
def test_gpu_features_match_the_cpu_features(surface_dataset):
    spec = get_backbone("efficientnet_lite0")
    model = build_model(spec, num_classes=4, img_size=IMG, pretrained=True).eval()
    records = scan_image_folder(surface_dataset).records[:16]
    on_cpu = cache_features(model.trunk, records, IMG, spec, 1, seed=0, device=CPU)
    on_gpu = cache_features(model.trunk, records, IMG, spec, 1, seed=0, device=resolve_device("cuda"))
    assert on_gpu.device.type == "cpu" and on_gpu.shape == on_cpu.shape == (2, 16, spec.feature_dim)
    relative = (on_gpu - on_cpu).norm() / on_cpu.norm()
    assert relative < 1e-2  # TF32 convolutions on recent GPUs: ~1e-3
    assert next(model.parameters()).device.type == "cpu"
    assert not any(tensor.is_inference() for tensor in model.state_dict().values())  # still trainable, loadable


@needs_cuda
def test_finetune_on_the_gpu_matches_the_cpu_run(surface_dataset, tmp_path):
    cfg = FinetuneConfig(img_size=IMG, epochs=4, augmented_views=1, ok_class="ok", seed=0)
    on_cpu = finetune(surface_dataset, tmp_path / "cpu", replace(cfg, device="cpu"))
    on_gpu = finetune(surface_dataset, tmp_path / "gpu", replace(cfg, device="cuda"))
    run_info = json.loads((on_gpu.run_dir / "run.json").read_text())
    assert run_info["trunk_device"].startswith("cuda (") and run_info["config"]["device"] == "cuda"
    assert json.loads((on_cpu.run_dir / "run.json").read_text())["trunk_device"] == "cpu"
    assert abs(on_gpu.metrics["balanced_accuracy"] - on_cpu.metrics["balanced_accuracy"]) <= 0.1
    assert on_gpu.metrics["balanced_accuracy"] >= 0.5  # well above chance (0.25) on these textures
