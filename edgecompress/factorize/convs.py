"""What every conv factorization shares: reading a conv's geometry and building the chain's steps.

The spatial steps of a chain carry the original stride, dilation and padding, split per axis when
a step covers one axis only (CP's kh x 1 / 1 x kw, spatial SVD). Zero padding stays on the convs
('same' included: a conv with padding='same' and the same kernel/dilation on its axis pads exactly
as the original did, asymmetric pads included). A non-zero padding mode (reflect, replicate,
circular) becomes one explicit ``Pad`` before the first spatial step and padding 0 on the convs:
padding commutes with the bias-free 1x1 and per-axis steps around it, so the chain stays exact.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from edgecompress.factorize.base import SkipLayer
from edgecompress.factorize.layers import Pad

CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str  # ints per axis, or 'same'
    padding_mode: str
    groups: int

    @property
    def group_in(self) -> int:
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        return self.out_channels // self.groups

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)

    def pad_amounts(self) -> tuple[int, ...]:
        """Padding in ``F.pad`` order (last axis first, (before, after) each)."""
        pads: list[int] = []
        for axis in reversed(range(self.dims)):
            if self.padding == "same":
                total = self.dilation[axis] * (self.kernel[axis] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [self.padding[axis]] * 2
        return tuple(pads)


def geometry(conv: nn.Module) -> ConvGeometry:
    padding = conv.padding
    if padding == "valid":
        padding = (0,) * len(conv.kernel_size)
    return ConvGeometry(len(conv.kernel_size), conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                        tuple(conv.stride), tuple(conv.dilation), padding if padding == "same" else tuple(padding),
                        conv.padding_mode, conv.groups)


def check_factorizable(conv: nn.Module) -> ConvGeometry:
    """The conv's geometry, or SkipLayer when nothing can be gained by factorizing it."""
    geo = geometry(conv)
    if geo.group_in == 1 and geo.groups > 1:
        raise SkipLayer(f"depthwise conv (groups={geo.groups}, one input channel per group): nothing to factorize")
    return geo


def grouped_weight(conv: nn.Module) -> torch.Tensor:
    """``conv.weight`` as float64 ``[groups, out/groups, in/groups, *kernel]``."""
    w = conv.weight.detach().double()
    return w.reshape(conv.groups, w.shape[0] // conv.groups, *w.shape[1:])


def explicit_pad(geo: ConvGeometry) -> list[nn.Module]:
    """``[Pad]`` for a non-zero padding mode with any padding, else ``[]``."""
    if geo.padding_mode == "zeros" or not any(geo.pad_amounts()):
        return []
    return [Pad(geo.pad_amounts(), geo.padding_mode)]


def conv_padding(geo: ConvGeometry, axes: tuple[int, ...]) -> tuple[int, ...] | str:
    """Padding for a step whose kernel spans ``axes`` (other axes have kernel 1)."""
    if geo.padding_mode != "zeros":
        return (0,) * geo.dims
    if geo.padding == "same":
        return "same"
    return tuple(geo.padding[a] if a in axes else 0 for a in range(geo.dims))


def spatial_step(geo: ConvGeometry, c_in: int, c_out: int, axes: tuple[int, ...], groups: int,
                 bias: bool = False) -> nn.Module:
    """A conv whose kernel, stride and dilation are the original's on ``axes`` and 1 elsewhere."""
    pick = lambda values: tuple(v if a in axes else 1 for a, v in enumerate(values))  # noqa: E731
    return CONVS[geo.dims](c_in, c_out, pick(geo.kernel), stride=pick(geo.stride), padding=conv_padding(geo, axes),
                           dilation=pick(geo.dilation), groups=groups, bias=bias)


def pointwise_step(geo: ConvGeometry, c_in: int, c_out: int, groups: int, bias: bool = False) -> nn.Module:
    return CONVS[geo.dims](c_in, c_out, 1, groups=groups, bias=bias)


def set_weight(conv: nn.Module, grouped: torch.Tensor) -> None:
    """Copy a ``[groups, out/groups, ...]`` weight into ``conv`` (as float32, its own shape)."""
    conv.weight.data.copy_(grouped.reshape(conv.weight.shape).to(conv.weight.dtype))


def copy_bias(conv: nn.Module, source: nn.Module) -> None:
    if source.bias is not None:
        conv.bias.data.copy_(source.bias.detach())
