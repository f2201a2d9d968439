"""CIFAR ResNets exactly as in the authors' code (paper.md section 3).

3x3 stem (3 -> 16) + BN + ReLU; three stages of n basic blocks with widths 16/32/64, stride 2 at
the first block of stages 2 and 3; a 1x1 conv + BN shortcut whenever the shape changes
("option B"); ReLU after the residual add; global average pool -> 64-d feature -> linear.
Depth = 6n + 2. Every model returns `(features, logits)`.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3, widths=(16, 32, 64)):
        super().__init__()
        if blocks_per_stage < 1 or num_classes < 2:
            raise ValueError(f"need blocks_per_stage >= 1 and num_classes >= 2, got {blocks_per_stage}, {num_classes}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        features = self.pool(self.layers(out)).flatten(1)
        return features, self.fc(features)


def resnet20(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(3, num_classes, **kw)


def resnet32(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(5, num_classes, **kw)


def resnet44(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(7, num_classes, **kw)


def resnet56(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(9, num_classes, **kw)


def resnet110(num_classes: int = 10, **kw) -> CifarResNet:
    return CifarResNet(18, num_classes, **kw)


def resnet18_cifar(num_classes: int = 10, **kw) -> CifarResNet:
    """The CIFAR ResNet-18 of the label-noise and adversarial recipes (paper.md section 3): 3x3 stem
    with 64 channels, no max-pool, 2 basic blocks per stage with widths 64/128/256/512, 512-d feature."""
    return CifarResNet(2, num_classes, widths=(64, 128, 256, 512), **kw)
