"""Deployable artifacts: FP32 ONNX with metadata (onnx_export.py), FP16 (fp16.py), explicit INT8
Q/DQ from calibration.json (qdq.py, onnx_ranges.py) and TensorRT engines (tensorrt_build.py,
with every version difference in tensorrt_compat.py)."""
