"""Put this folder first on PYTHONPATH to run edge-tl as the light device install would: torch,
torchvision, timm, NNI and safetensors cannot be imported (any import of them raises ImportError).

Used by tests/test_device_side.py and benchmarks/device_verify.py; a quicker stand-in for a fresh
venv with ``pip install edge-tl`` (benchmarks/install_profiles.sh measures that one).
"""
import sys

BLOCKED = {"torch", "torchvision", "timm", "nni", "safetensors"}


class _TrainingSideBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this device (scripts/device_python blocks it)")
        return None


sys.meta_path.insert(0, _TrainingSideBlocker())
