"""The factorized layers: small chains of standard torch layers that export as standard ONNX nodes."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgecompress.factorize.base import FactorizedLayer


class LowRankLinear(FactorizedLayer):
    """``W ~ U V``: Linear(in -> r, no bias) then Linear(r -> out, bias): two MatMul/Gemm nodes.
    Works on any leading dimensions (2-D and 3-D activations alike)."""

    def __init__(self, first: nn.Linear, second: nn.Linear, method: str = "svd"):
        super().__init__()
        self.method = method
        self.first, self.second = first, second

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    def ranks(self) -> list[int]:
        return [self.first.out_features]
