"""ResNet-18 (He et al.), written out here because there is no CPU build of torchvision.

``resnet18`` is the ImageNet layout (224x224, 7x7/2 stem + max-pool); ``resnet18_cifar`` the usual
CIFAR layout (32x32, 3x3/1 stem, no max-pool). Parameter counts match torchvision's (11.69 M).
"""

from __future__ import annotations

import torch.nn as nn

from edgecompress.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False):
        super().__init__()
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, c_in = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model(input_shape=(1, 3, 224, 224))
def resnet18() -> nn.Module:
    """ResNet-18, ImageNet layout (1000 classes)."""
    return ResNet18()


@register_model(input_shape=(1, 3, 32, 32))
def resnet18_cifar() -> nn.Module:
    """ResNet-18, CIFAR layout (3x3 stem, no max-pool, 10 classes)."""
    return ResNet18(num_classes=10, cifar_stem=True)
