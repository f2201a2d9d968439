"""CIFAR ResNets: ResNet-20..110 of the authors' CIFAR code and the CIFAR ResNet-18 of the
label-noise and adversarial code (paper.md section 3).

3x3 stem + BN + ReLU (16 channels; 64 for ResNet-18, no max-pool); stages of n basic blocks
(widths 16/32/64, or 64/128/256/512 for ResNet-18), stride 2 at the first block of every stage
after the first; a 1x1 conv + BN shortcut whenever the shape changes ("option B"); ReLU after the
residual add; global average pool -> feature -> linear. Depth = 6n + 2 with three stages (8n + 2
with four). Returns `(features, logits)` with `logits = fc(features)`.

The layout is that of the references: kahnchana/opl classification/cifar/models/resnet_cifar.py
(pytorchcv's CIFARResNet: ResUnit = two conv3x3_blocks + conv1x1_block identity, ReLU after the add,
AvgPool2d(8)) and the label-noise fork's / MART's models/resnet.py (ResNet-18, avg_pool2d(4)).

`init` (the references differ):
* "pytorchcv": the authors' CIFAR code (`CIFARResNet._init_params`): every Conv2d weight drawn
  again with `kaiming_uniform_` at its defaults (fan-in, gain sqrt(2): U(-b, b), b = sqrt(6 /
  fan_in)); BatchNorm and the final Linear keep PyTorch's defaults (BN weight 1, bias 0; Linear
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias).
* "pytorch": PyTorch's default initialisation of every layer (Conv2d: U(-b, b), b = 1 /
  sqrt(fan_in)), as the label-noise fork's and MART's ResNet-18, which re-initialise nothing.

`feature`:
* "post_relu" (the references): the pooled output of the last block, after its final ReLU; every
  coordinate is >= 0, so every cosine between two features is >= 0.
* "pre_relu": the last block's final ReLU is removed: the feature is its pooled residual sum
  (signed), and the classifier reads that signed vector. Not in any reference: it lets OPL push
  different classes to cosine 0 in the signed sense (docs/deviations.md).
"""

import torch
from torch import nn

INITS = ("pytorchcv", "pytorch")
FEATURES = ("post_relu", "pre_relu")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, final_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.final_relu = final_relu
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3, widths=(16, 32, 64),
                 init: str = "pytorchcv", feature: str = "post_relu"):
        super().__init__()
        if blocks_per_stage < 1 or num_classes < 2:
            raise ValueError(f"need blocks_per_stage >= 1 and num_classes >= 2, got {blocks_per_stage}, {num_classes}")
        if init not in INITS:
            raise ValueError(f"model.init must be one of {INITS}, got {init!r}")
        if feature not in FEATURES:
            raise ValueError(f"model.feature must be one of {FEATURES}, got {feature!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                last = stage == len(widths) - 1 and block == blocks_per_stage - 1
                layers.append(BasicBlock(in_planes, planes, stride, final_relu=not (last and feature == "pre_relu")))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        if init == "pytorchcv":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight)

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


def resnet18_cifar(num_classes: int = 10, init: str = "pytorch", **kw) -> CifarResNet:
    """The CIFAR ResNet-18 of the label-noise and adversarial recipes: 3x3 stem with 64 channels, no
    max-pool, 2 basic blocks per stage with widths 64/128/256/512, 512-d feature, PyTorch's default
    initialisation (as the label-noise fork's and MART's models/resnet.py)."""
    return CifarResNet(2, num_classes, widths=(64, 128, 256, 512), init=init, **kw)
