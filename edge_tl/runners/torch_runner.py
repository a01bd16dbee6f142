"""PyTorch eager runner (the float reference)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edge_tl.runners.base import Runner, TensorSpec


class TorchRunner(Runner):
    """Runs an nn.Module in eval mode under ``torch.no_grad`` on ``device``."""

    def __init__(self, model, img_size: int | None = None, input_name: str = "input",
                 output_name: str = "logits", device: str = "cpu") -> None:
        super().__init__(f"torch:{type(model).__name__}")
        self.model, self.img_size, self.device = model, img_size, device
        self.input_name, self.output_name = input_name, output_name

    def _activate(self) -> None:
        self.model.eval().to(self.device)

    def _deactivate(self) -> None:
        pass

    def _input_specs(self) -> dict[str, TensorSpec]:
        return {self.input_name: TensorSpec(self.input_name, (None, 3, self.img_size, self.img_size), np.dtype(np.float32))}

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            output = self.model(torch.from_numpy(np.ascontiguousarray(feed[self.input_name])).to(self.device))
        return {self.output_name: output.detach().cpu().numpy()}
