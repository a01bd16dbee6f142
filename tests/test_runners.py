"""edge_tl/runners: one Runner interface; PyTorch and ONNX Runtime agree; feeds are checked."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edge_tl.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_tl.runners import Runner, TensorSpec
from edge_tl.runners.onnxruntime_runner import CPU, OnnxRuntimeRunner
from edge_tl.runners.torch_runner import TorchRunner
from export.onnx_export import export_onnx

PX = 32
META = {"mean": [0.5] * 3, "std": [0.25] * 3, "class_names": ["ok", "defect"], "ok_class": "ok"}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 2),
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(model, PX, folder / "dynamic.onnx", metadata=META)
    export_onnx(model, PX, folder / "static.onnx", dynamic_batch=False, metadata=META)
    return folder


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, PX, PX)).astype(np.float32)


def test_torch_and_onnxruntime_runners_agree(model, onnx_files):
    x = _x(3)
    with TorchRunner(model, img_size=PX) as torch_runner, \
            OnnxRuntimeRunner(onnx_files / "dynamic.onnx", intra_op_threads=1) as ort_runner:
        want = torch_runner.infer({"input": x})
        got = ort_runner.infer({"input": x})
        assert set(want) == set(got) == {"logits"}
        assert got["logits"].shape == (3, 2)
        assert np.max(np.abs(got["logits"] - want["logits"])) < 1e-5
        assert ort_runner.last_inference_ms > 0 and torch_runner.last_inference_ms > 0
        assert ort_runner.session.get_session_options().intra_op_num_threads == 1
        assert ort_runner.input_specs() == {"input": TensorSpec("input", (None, 3, PX, PX), np.dtype(np.float32))}
    assert not ort_runner.is_active and ort_runner.session is None


def test_feeds_are_checked(model, onnx_files):
    with OnnxRuntimeRunner(onnx_files / "static.onnx") as runner:
        assert runner.input_specs()["input"].shape == (1, 3, PX, PX)
        with pytest.raises(ConfigError, match=r"missing \['input'\], unexpected \['image'\]"):
            runner.infer({"image": _x(1)})
        with pytest.raises(ConfigError, match="dtype float64"):
            runner.infer({"input": _x(1).astype(np.float64)})
        with pytest.raises(ConfigError, match=r"shape \(2, 3, 32, 32\).*\(1, 3, 32, 32\)"):
            runner.infer({"input": _x(2)})
        with pytest.raises(ConfigError, match="numpy array"):
            runner.infer({"input": torch.zeros(1, 3, PX, PX)})
    with TorchRunner(model, img_size=PX) as runner:
        with pytest.raises(ConfigError, match=r"shape \(1, 1, 32, 32\)"):
            runner.infer({"input": np.zeros((1, 1, PX, PX), np.float32)})
        assert runner.infer({"input": _x(5)})["logits"].shape == (5, 2)  # batch is dynamic


def test_runner_lifecycle_and_errors(model, onnx_files, tmp_path):
    runner = TorchRunner(model, img_size=PX)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"input": _x(1)})
    with pytest.raises(ArtifactError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx").activate()
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="cannot load"):
        OnnxRuntimeRunner(tmp_path / "garbage.onnx").activate()
    with pytest.raises(BackendUnavailableError, match="NoSuchExecutionProvider"):
        OnnxRuntimeRunner(onnx_files / "static.onnx", providers=["NoSuchExecutionProvider", CPU]).activate()
    with OnnxRuntimeRunner((onnx_files / "static.onnx").read_bytes()) as runner:  # serialized bytes work too
        assert runner.infer({"input": _x(1)})["logits"].shape == (1, 2)


def test_backends_are_imported_only_by_their_runners():
    code = (
        "import sys, edge_tl.runners, edge_tl.runners.tensorrt_runner, edge_tl.runners.onnxruntime_runner;"
        "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'pycuda') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_runner_subclass_contract():
    class Doubler(Runner):
        def __init__(self):
            super().__init__("doubler")
            self.activations = 0

        def _activate(self):
            self.activations += 1

        def _deactivate(self):
            pass

        def _input_specs(self):
            return {"x": TensorSpec("x", (None, 2), np.dtype(np.float32))}

        def _infer(self, feed):
            return {"y": feed["x"] * 2}

    runner = Doubler()
    with runner:
        runner.activate()  # idempotent
        assert runner.infer({"x": np.ones((3, 2), np.float32)})["y"].tolist() == [[2.0, 2.0]] * 3
    assert runner.activations == 1 and not runner.is_active


def test_tensorrt_runner_needs_tensorrt(tmp_path):
    from edge_tl.runners.tensorrt_runner import TensorRTRunner

    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="tensorrt and pycuda"):
            TensorRTRunner(tmp_path / "model.engine").activate()
        pytest.skip("TensorRT/pycuda are not installed on this machine: only the missing-backend error is tested")
    with pytest.raises(ArtifactError, match="does not exist"):
        TensorRTRunner(tmp_path / "model.engine").activate()
