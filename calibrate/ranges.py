"""Activation range methods and INT8 quantization parameters.

A :class:`RangeObserver` sees a tensor's activations batch after batch and gives its calibration
range with one of three methods:

- ``minmax``: the observed minimum and maximum (exact);
- ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles (default ``p = 99.99``), read from
  a histogram, so within one histogram bin of ``numpy.percentile`` on all values;
- ``entropy``: TensorRT's entropy calibration: a histogram of ``|x|`` with ``num_bins`` bins, and
  the clipping threshold ``t`` whose 128-level quantization loses the least information (smallest
  KL divergence); the range is the observed range clipped to ``[-t, t]``.

The histogram keeps a fixed bin width with edges at multiples of it, so merging batches (and
halving the resolution when the range grows) is exact: no value is ever re-binned by guesswork.

Scales are rounded to float32 here, once, so calibration.json, the Q/DQ ONNX (float32 scales) and
the TensorRT cache (float32) all hold the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_tl.errors import ConfigError

RANGE_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_PERCENTILE = 99.99
INT8_MAX = 127
UINT8_MAX = 255


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(value))


def check_range_method(method: str, percentile: float = DEFAULT_PERCENTILE) -> str:
    if method not in RANGE_METHODS:
        raise ConfigError(f"unknown range method {method!r}; choose one of {', '.join(RANGE_METHODS)}")
    if method == "percentile" and not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile {percentile} is outside (50, 100]; use e.g. {DEFAULT_PERCENTILE}")
    return method


def symmetric_int8_scale(absmax: float) -> float:
    """Symmetric int8 scale ``absmax / 127`` (float32); an all-zero tensor gets ``1 / 127``."""
    absmax = float(absmax)
    if not math.isfinite(absmax) or absmax < 0:
        raise ValueError(f"absmax must be finite and >= 0, got {absmax}")
    return float32((absmax if absmax > 0 else 1.0) / INT8_MAX)


def asymmetric_uint8(min_value: float, max_value: float) -> tuple[float, int]:
    """(scale, zero_point) of an asymmetric uint8 quantization covering ``[min, max]``.

    The range is widened to include 0 so that zero (padding, ReLU outputs) is exact; a range of
    width zero gets scale ``1 / 255``. A range starting at 0 gives zero point 0.
    """
    lo, hi = min(float(min_value), 0.0), max(float(max_value), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range [{min_value}, {max_value}] is not finite")
    scale = float32((hi - lo) / UINT8_MAX if hi > lo else 1.0 / UINT8_MAX)
    zero_point = int(np.clip(round(-lo / scale), 0, UINT8_MAX))
    return scale, zero_point


def per_channel_symmetric_int8_scales(weight: np.ndarray, axis: int = 0) -> np.ndarray:
    """float32 symmetric int8 scales of ``weight`` along ``axis`` (output channels), ``absmax / 127``."""
    weight = np.asarray(weight, dtype=np.float32)
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    absmax = np.abs(moved).max(axis=1) if moved.shape[1] else np.zeros(moved.shape[0], np.float32)
    return np.asarray([symmetric_int8_scale(value) for value in absmax], dtype=np.float32)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def entropy_threshold_bins(hist: np.ndarray, num_quantized_bins: int = 128) -> int:
    """TensorRT entropy calibration on a histogram of ``|x|``: the number of leading bins to keep.

    The first bin (``|x|`` near 0) is set to the second's count before the search. For every
    candidate ``i``, P is the first ``i`` bins with the outliers added to the last one,
    Q is those bins merged into ``num_quantized_bins`` levels and spread back evenly over each
    level's non-empty bins; the ``i`` with the smallest KL(P || Q) wins.
    """
    hist = np.asarray(hist, dtype=np.float64).copy()
    num_bins = hist.size
    if num_bins > 1:
        # the zero bin of a ReLU output holds most values; left alone it pulls the threshold far
        # below the real range (NVIDIA's pytorch-quantization flattens it the same way)
        hist[0] = hist[1]
    if num_bins <= num_quantized_bins or hist.sum() == 0:
        return num_bins
    best_i, best_kl = num_bins, math.inf
    total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    for i in range(num_quantized_bins, num_bins + 1):
        p = hist[:i].copy()
        p[i - 1] += total_tail[i]
        nonzero = p > 0
        # merge i bins into num_quantized_bins levels (level of bin j is floor(j * levels / i))
        levels = (np.arange(i) * num_quantized_bins) // i
        level_sum = np.bincount(levels, weights=hist[:i], minlength=num_quantized_bins)
        level_nonzero = np.bincount(levels, weights=nonzero, minlength=num_quantized_bins)
        q = np.where(nonzero, level_sum[levels] / np.maximum(level_nonzero[levels], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p /= p_sum
        q /= q_sum
        # P is non-zero where Q is zero only when the last level holds nothing but outliers
        q = np.where((p > 0) & (q == 0), 1e-4, q)
        kl = _kl_divergence(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@dataclass
class RangeObserver:
    """Streaming range statistics of one tensor: exact min/max and an exact-merge histogram.

    ``num_bins`` sets the resolution of the ``|x|`` histogram the first batch starts from (bin
    width ``absmax / num_bins``); the histogram halves its resolution whenever the signed span
    would exceed ``8 * num_bins`` bins.
    """

    num_bins: int = 2048
    count: int = 0
    min_value: float = math.inf
    max_value: float = -math.inf
    bin_width: float = 0.0
    first_bin: int = 0  # index of hist[0]: it covers [first_bin * w, (first_bin + 1) * w)
    hist: np.ndarray | None = None

    def update(self, values) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        if not np.all(np.isfinite(values)):
            raise ValueError("activations contain NaN or inf; check the model and the calibration images")
        lo, hi = float(values.min()), float(values.max())
        self.count += values.size
        self.min_value, self.max_value = min(self.min_value, lo), max(self.max_value, hi)
        if self.hist is None:
            absmax = max(abs(lo), abs(hi))
            self.bin_width = absmax / self.num_bins if absmax > 0 else 1.0 / self.num_bins
            self.hist = np.zeros(0, dtype=np.int64)
            self.first_bin = int(math.floor(lo / self.bin_width))
        while True:
            k_lo = int(math.floor(lo / self.bin_width))
            k_hi = int(math.floor(hi / self.bin_width))
            start = min(k_lo, self.first_bin)
            stop = max(k_hi + 1, self.first_bin + self.hist.size)
            if stop - start <= 8 * self.num_bins:
                break
            self._halve_resolution()
        if start < self.first_bin or stop > self.first_bin + self.hist.size:
            grown = np.zeros(stop - start, dtype=np.int64)
            offset = self.first_bin - start
            grown[offset:offset + self.hist.size] = self.hist
            self.hist, self.first_bin = grown, start
        index = np.floor(values / self.bin_width).astype(np.int64) - self.first_bin
        np.clip(index, 0, self.hist.size - 1, out=index)  # floor rounding at an exact edge
        self.hist += np.bincount(index, minlength=self.hist.size)

    def _halve_resolution(self) -> None:
        indices = np.arange(self.first_bin, self.first_bin + self.hist.size) // 2
        new_first = int(indices[0]) if indices.size else self.first_bin // 2
        merged = np.bincount(indices - new_first, weights=self.hist).astype(np.int64)
        self.hist, self.first_bin, self.bin_width = merged, new_first, self.bin_width * 2

    def _require_data(self) -> np.ndarray:
        if self.hist is None or self.count == 0:
            raise ValueError("no activations were observed; feed at least one calibration batch")
        return self.hist

    def minmax(self) -> tuple[float, float]:
        self._require_data()
        return self.min_value, self.max_value

    def _quantile(self, fraction: float) -> float:
        hist = self._require_data()
        cumulative = np.cumsum(hist)
        target = fraction * cumulative[-1]
        k = int(np.searchsorted(cumulative, target, side="left"))
        k = min(k, hist.size - 1)
        before = cumulative[k - 1] if k > 0 else 0
        inside = (target - before) / hist[k] if hist[k] else 0.0
        value = (self.first_bin + k + inside) * self.bin_width
        return min(max(value, self.min_value), self.max_value)

    def percentile(self, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
        check_range_method("percentile", percentile)
        return self._quantile(1.0 - percentile / 100.0), self._quantile(percentile / 100.0)

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """(counts, bin width) of ``|x|``: bin j covers ``[j * w, (j + 1) * w)``."""
        hist = self._require_data()
        bins = np.arange(self.first_bin, self.first_bin + hist.size)
        abs_index = np.where(bins >= 0, bins, -bins - 1)  # [-(j+1)w, -jw) folds onto [jw, (j+1)w)
        return np.bincount(abs_index, weights=hist).astype(np.int64), self.bin_width

    def entropy(self, num_bins: int | None = None, num_quantized_bins: int = 128) -> tuple[float, float]:
        hist, width = self.abs_histogram()
        num_bins = num_bins or self.num_bins
        factor = max(1, math.ceil(hist.size / num_bins))
        if factor > 1:
            hist = np.bincount(np.arange(hist.size) // factor, weights=hist).astype(np.int64)
            width *= factor
        keep = entropy_threshold_bins(hist, num_quantized_bins)
        threshold = keep * width
        return max(self.min_value, -threshold), min(self.max_value, threshold)

    def compute(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
        """The calibration range ``(min, max)`` by ``method`` (minmax, percentile or entropy)."""
        check_range_method(method, percentile)
        if method == "minmax":
            return self.minmax()
        if method == "percentile":
            return self.percentile(percentile)
        return self.entropy()

