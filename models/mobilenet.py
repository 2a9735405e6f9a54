"""MobileNetV2 (Sandler et al. 2018), the mobile reference: inverted residuals with depthwise convs.

Written out here (no CPU torchvision); same layout and parameter count as torchvision's (3.50 M).
"""

from __future__ import annotations

import torch.nn as nn

from edgecompress.models.registry import register_model


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers = [] if expand == 1 else [_conv_bn(c_in, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride)
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [_conv_bn(3, 32, 3, 2)], 32
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers.append(_conv_bn(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model(input_shape=(1, 3, 224, 224))
def mobilenet_v2() -> nn.Module:
    """MobileNetV2 1.0, 224x224, 1000 classes: the mobile reference."""
    return MobileNetV2()
