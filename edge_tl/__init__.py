"""edge-tl: transfer learning, NNI compression, INT8 calibration and verified export for edge vision models."""

__version__ = "0.1.0"
