"""One Runner interface over PyTorch, ONNX Runtime and TensorRT.

``with runner: outputs = runner.infer({"input": x})``. Backends are imported only inside their
runner modules, so ``import edge_tl.runners`` works without ONNX Runtime, TensorRT or pycuda.
"""
from edge_tl.runners.base import Runner, TensorSpec

__all__ = ["Runner", "TensorSpec"]
