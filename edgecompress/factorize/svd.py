"""``svd``: truncated SVD of a Linear weight -> two Linears (two MatMul nodes).

The singular values are split evenly (sqrt(s) into each factor), which keeps the two factors'
value ranges alike: that matters when the chain is quantized to int8 later.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgecompress.factorize.base import SkipLayer
from edgecompress.factorize.layers import LowRankLinear
from edgecompress.factorize.ranks import RankSpec, single_rank
from edgecompress.factorize.registry import Decomposition, register


def truncated_svd(matrix: torch.Tensor, spec: RankSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``matrix [m, n] ~ A [m, r] @ B [r, n]`` with the rank from ``spec``; returns (A, B, notes)."""
    m, n = matrix.shape
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    rank, notes = single_rank(spec, min(m, n), lambda r: r * (m + n), m * n, s.numpy())
    if rank < 1:
        raise SkipLayer(f"no rank saves parameters at {spec.describe()} ({m}x{n} matrix)")
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), notes


@register("svd", nn.Linear)
def svd_linear(layer: nn.Linear, spec: RankSpec, method: str = "svd") -> Decomposition:
    a, b, notes = truncated_svd(layer.weight, spec)
    rank = a.shape[1]
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    first.weight.data.copy_(b)
    second.weight.data.copy_(a)
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias)
    return Decomposition(LowRankLinear(first, second, method), notes)
