"""The factorized layers: small chains of standard torch layers that export as standard ONNX nodes.

``LowRankLinear`` is two Linears (two MatMul/Gemm nodes). The conv chains are ``ConvChain``
subclasses: a sequence of plain ``nn.Conv1d``/``nn.Conv2d`` steps (1x1 steps stay convs, so that
onnxruntime moves them to its blocked channel layout too) with, only for a non-zero padding mode,
an explicit ``Pad`` before the first spatial step. A grouped conv is factorized per group and its
chain is made of grouped convs, so ``dense_weight`` works on weights viewed as ``[groups, ...]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class Pad(nn.Module):
    """``F.pad`` with a fixed mode ('reflect', 'replicate', 'circular'): one ONNX Pad node
    (circular: Slice + Concat), exactly what the dense conv exports for the same padding mode."""

    def __init__(self, pads: tuple[int, ...], mode: str):
        super().__init__()
        self.pads, self.mode = tuple(pads), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}"


class ConvChain(FactorizedLayer):
    """A factorized conv: ``steps`` run in order. Subclasses rebuild the dense weight from the convs."""

    def __init__(self, method: str, steps: list[nn.Module], groups: int = 1):
        super().__init__()
        self.method = method
        self.groups = groups
        self.steps = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps(x)

    def convs(self) -> list[nn.Module]:
        return [m for m in self.steps if isinstance(m, (nn.Conv1d, nn.Conv2d))]

    @property
    def in_channels(self) -> int:
        return self.convs()[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.convs()[-1].out_channels

    def _grouped(self, conv: nn.Module) -> torch.Tensor:
        """``conv.weight`` as ``[groups, out/groups, in/groups, *kernel]`` (the chain's group count)."""
        w = conv.weight
        return w.reshape(self.groups, w.shape[0] // self.groups, *w.shape[1:])

    def _ungroup(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])


class ChannelSVDConv(ConvChain):
    """Channel SVD: conv k (I -> r per group, stride/padding/dilation) then conv 1x1 (r -> O, bias)."""

    def dense_weight(self) -> torch.Tensor:
        first, second = (self._grouped(c) for c in self.convs())
        out = second.flatten(3)[..., 0]  # [g, o, r]
        return self._ungroup(torch.einsum("gor,gri...->goi...", out, first))

    def ranks(self) -> list[int]:
        return [self.convs()[0].out_channels // self.groups]


class InputSVDConv(ConvChain):
    """Channel SVD on the input side: conv 1x1 (I -> r per group) then conv k (r -> O, bias, stride/padding/
    dilation). It keeps more rank than ``ChannelSVDConv`` where O is small against I * k (CREPE's 1024 -> 128
    conv with 64 taps)."""

    def dense_weight(self) -> torch.Tensor:
        first, second = (self._grouped(c) for c in self.convs())
        project = first.flatten(3)[..., 0]  # [g, r, i]
        return self._ungroup(torch.einsum("gor...,gri->goi...", second, project))

    def ranks(self) -> list[int]:
        return [self.convs()[0].out_channels // self.groups]


class SpatialSVDConv(ConvChain):
    """Spatial SVD (Jaderberg): conv kh x 1 (I -> r) then conv 1 x kw (r -> O, bias)."""

    def dense_weight(self) -> torch.Tensor:
        first, second = (self._grouped(c) for c in self.convs())
        vertical, horizontal = first[..., 0], second[:, :, :, 0, :]  # [g, r, i, kh], [g, o, r, kw]
        return self._ungroup(torch.einsum("grih,gorw->goihw", vertical, horizontal))

    def ranks(self) -> list[int]:
        return [self.convs()[0].out_channels // self.groups]


class TuckerConv(ConvChain):
    """Tucker-2: conv 1x1 (I -> R_in) -> core conv k (R_in -> R_out) -> conv 1x1 (R_out -> O, bias)."""

    def dense_weight(self) -> torch.Tensor:
        first, core, last = (self._grouped(c) for c in self.convs())
        u_in, u_out = first.flatten(3)[..., 0], last.flatten(3)[..., 0]  # [g, R_in, i], [g, o, R_out]
        return self._ungroup(torch.einsum("goa,gab...,gbi->goi...", u_out, core, u_in))

    def ranks(self) -> list[int]:
        """[R_out, R_in] per group (the core's output and input channels)."""
        core = self.convs()[1]
        return [core.out_channels // self.groups, core.in_channels // self.groups]


class CPConv(ConvChain):
    """CP (Lebedev): conv 1x1 (I -> R) -> depthwise kh x 1 -> depthwise 1 x kw -> conv 1x1 (R -> O, bias);
    for Conv1d one depthwise conv k."""

    def dense_weight(self) -> torch.Tensor:
        convs = self.convs()
        g = self.groups
        first = self._grouped(convs[0]).flatten(3)[..., 0]  # [g, R, i]
        last = self._grouped(convs[-1]).flatten(3)[..., 0]  # [g, o, R]
        spatial = [c.weight.reshape(g, c.weight.shape[0] // g, -1) for c in convs[1:-1]]  # [g, R, k_axis]
        letters = "hw"[: len(spatial)]
        terms = ",".join(f"gr{a}" for a in letters)
        w = torch.einsum(f"gor,{terms},gri->goi{letters}", last, *spatial, first)
        return self._ungroup(w)

    def ranks(self) -> list[int]:
        return [self.convs()[0].out_channels // self.groups]
