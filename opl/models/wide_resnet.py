"""WideResNet-depth-k (Zagoruyko & Komodakis, 2016) as in the TRADES/MART code: the WRN-34-10 of
the adversarial-training experiments (paper.md section 3).

Stem 3x3 conv 3 -> 16 (no BN after it: blocks are pre-activation); three stages of n = (depth-4)/6
basic blocks with widths 16k, 32k, 64k and strides 1, 2, 2; each block is BN-ReLU-conv3x3-BN-ReLU-
(dropout)-conv3x3 plus a shortcut that is the identity, or a 1x1 conv (no BN) when the shape changes;
final BN-ReLU, global average pool -> 64k-d feature -> linear. Returns `(features, logits)`.

WRN-34-10 for CIFAR-10 has 46,160,474 parameters. (TRADES' file also builds an unused `sub_block1`,
a copy of stage 1 never called in forward; counting it gives 48,262,586. We do not build it.)
"""

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As in TRADES: a projection shortcut reads the PRE-ACTIVATED input, the identity the raw one.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 34), got {depth}")
        if widen_factor < 1 or num_classes < 2 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need widen_factor >= 1, num_classes >= 2, 0 <= dropout < 1; "
                             f"got {widen_factor}, {num_classes}, {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 16
        for planes, stride in zip(widths, (1, 2, 2)):
            for block in range(n):
                layers.append(WideBasicBlock(in_planes, planes, stride if block == 0 else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(8) of the original for 32x32 input
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # TRADES init: N(0, sqrt(2 / (k*k*out_channels))) == kaiming fan_out
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        features = self.pool(out).flatten(1)
        return features, self.fc(features)


def wide_resnet(depth: int = 34, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes, dropout)


def wrn34_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(34, 10, num_classes)
