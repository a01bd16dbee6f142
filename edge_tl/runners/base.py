"""The Runner protocol (after NVIDIA Polygraphy): activate, infer with checked feeds, deactivate.

Subclasses implement ``_activate``, ``_deactivate``, ``_input_specs`` and ``_infer``; the base
class checks that every feed has exactly the runner's input names, their dtypes and the fixed
dimensions of their shapes, and records the wall-clock time of each inference in
``last_inference_ms`` (host to host, copies included; the TensorRT runner also gives
``last_device_ms`` from CUDA events).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from edge_tl.errors import ConfigError


@dataclass(frozen=True)
class TensorSpec:
    """An input's name, shape (None for a dynamic dimension) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def check(self, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise ConfigError(f"input {self.name!r} must be a numpy array, got {type(array).__name__}")
        if array.dtype != self.dtype:
            raise ConfigError(f"input {self.name!r} has dtype {array.dtype}, the model takes {self.dtype}; cast it")
        fits = array.ndim == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, array.shape)
        )
        if not fits:
            shown = tuple("?" if dim is None else dim for dim in self.shape)
            raise ConfigError(f"input {self.name!r} has shape {array.shape}, the model takes {shown}")


class Runner(abc.ABC):
    """``with runner: outputs = runner.infer(feed)``; ``feed`` maps input names to numpy arrays."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.last_inference_ms: float | None = None

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._deactivate()
            finally:
                self.is_active = False

    def _require_active(self) -> None:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active; use it inside `with runner:`")

    def input_specs(self) -> dict[str, TensorSpec]:
        self._require_active()
        return self._input_specs()

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; returns {output name: numpy array}."""
        self._require_active()
        specs = self._input_specs()
        missing, unexpected = sorted(set(specs) - set(feed)), sorted(set(feed) - set(specs))
        if missing or unexpected:
            raise ConfigError(
                f"runner {self.name} takes inputs {sorted(specs)}; missing {missing}, unexpected {unexpected}"
            )
        for name, spec in specs.items():
            spec.check(feed[name])
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.last_inference_ms = (time.perf_counter() - start) * 1000.0
        return outputs

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _input_specs(self) -> dict[str, TensorSpec]: ...

    @abc.abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
