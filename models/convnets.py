"""Small convolutional reference nets: LeNet-5 (seeds 000-001) and the CIFAR nets of seed 003, section 7."""

from __future__ import annotations

import torch.nn as nn

from edgecompress.models.registry import register_model


@register_model(input_shape=(1, 1, 28, 28))
def lenet5() -> nn.Module:
    """LeNet-5 for 28x28 digits: two 5x5 convs, three FC layers."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def _cifar_features() -> nn.Sequential:
    # Seed 003, section 7: 3x3 convs 64/128/128/128, BN + ReLU, two 3x3/2 max-pools (32 -> 16 -> 8).
    # The fourth conv has no BN/ReLU in the paper's listing; we keep it that way.
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 64), nn.MaxPool2d(3, stride=2, padding=1),
        *block(64, 128), nn.MaxPool2d(3, stride=2, padding=1),
        *block(128, 128),
        nn.Conv2d(128, 128, 3, padding=1),
    )


class CifarConv(nn.Module):
    """Seed 003's 'conv' net. The paper's 4x4/4 average pool on the 8x8 map leaves 2x2x128 values
    but its classifier takes 128: we pool 4x4/4 and then average the remaining 2x2 (a global pool)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _cifar_features()
        self.pool = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class CifarConvFC(nn.Module):
    """Seed 003's 'conv-fc' net: the average pool replaced by FC 8192x1536 and 1536x512."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _cifar_features()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128 * 8 * 8, 1536)
        self.fc2 = nn.Linear(1536, 512)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.flatten(self.features(x))
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.classifier(x)


@register_model(input_shape=(1, 3, 32, 32))
def cifar_conv() -> nn.Module:
    """Seed 003 'conv': 3x3 convs 64/128/128/128 + BN, max-pools, average pool, FC 128->10."""
    return CifarConv()


@register_model(input_shape=(1, 3, 32, 32))
def cifar_conv_fc() -> nn.Module:
    """Seed 003 'conv-fc': the conv net with FC 8192x1536 and 1536x512 before the classifier."""
    return CifarConvFC()
