"""Counting what a model costs: parameters and multiply-accumulates (MACs), in total and per module.

MACs come from ``torch.utils.flop_counter`` (convolutions and matrix products as PyTorch runs
them, attention included), halved: one MAC is two FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Total MACs of one forward pass on ``inputs`` and MACs per module path ('' is the root)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    per_module: dict[str, int] = {}
    root = type(module).__name__
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key[len(root) + 1 :] if key.startswith(root + ".") else ("" if key == root else key)
        per_module[path] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module
