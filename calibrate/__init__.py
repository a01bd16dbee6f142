"""Calibration for INT8: sources (sources.py), range methods (ranges.py), calibration.json
(calibration_file.py, FORMAT.md), hook-based collection (observe.py) and the TensorRT
implicit-INT8 cache and calibrator (tensorrt_cache.py, tensorrt_calibrator.py)."""
