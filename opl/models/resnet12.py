"""ResNet-12 exactly as RFS builds it: WangYueFt/rfs models/resnet.py `resnet12` with the arguments
of models/util.py:16 (miniImageNet, tieredImageNet) and :25 (CIFAR-FS, FC100):
`avg_pool=True, drop_rate=0.1, dropblock_size=5 (or 2), keep_prob=1.0`.

- Four residual blocks of widths 64-160-320-640 (resnet.py:157-164). Each block: three 3x3 convs
  (no bias) with BatchNorm, LeakyReLU(0.1) after the first two; a 1x1-conv (stride 1) + BN
  shortcut; add, LeakyReLU(0.1), 2x2 max-pool (resnet.py:88-135).
- Regularisation after the pool (resnet.py:137-144): blocks 1-2 plain dropout p=drop_rate;
  blocks 3-4 DropBlock with `block_size`, whose drop rate ramps linearly from 0 to drop_rate over
  the first 20 * 2000 = 40,000 forward passes (resnet.py:140), with
  gamma = rate / bs^2 * H^2 / (H - bs + 1)^2 (resnet.py:141) and rescaling by
  numel / kept (resnet.py:48-51). Inactive in eval mode.
- Global average pool -> 640-d feature -> linear classifier (resnet.py:165-167, 181-182, 220-225);
  RFS's `self.dropout` (keep_prob, resnet.py:170) is never applied in its forward, so it is left out.
- Which cells DropBlock zeroes: see `DropBlock` (RFS's masks have a pairing defect, reproduced by
  default).
- Kaiming-normal conv init (fan_out, leaky_relu), BN weight 1 / bias 0 (resnet.py:173-178).

The ramp counter: RFS keeps a Python int per block, incremented on every forward call, training
and evaluation alike, and lost on resume. Here it is one buffer, `dropblock_step`, saved with the
weights, counting training-mode forward passes only.
Parameter and module names follow RFS (layer1.0.conv1, ..., classifier), so RFS's released
weights load with `load_state_dict(..., strict=False)` (only `dropblock_step` is absent there).
Returns `(features, logits)`.
"""

import torch
import torch.nn.functional as F
from torch import nn


class DropBlock(nn.Module):
    """RFS's DropBlock: seeds ~ Bernoulli(gamma) on the (H - bs + 1) x (W - bs + 1) grid, each seed
    zeroing cells of the bs x bs block that starts at it, then rescaling by numel / kept.

    mask="full" zeroes every seed's whole block (DropBlock as intended). mask="rfs" reproduces which
    cells RFS's `_compute_block_mask` (resnet.py:55-85) actually zeroes: it pairs the n seeds (in
    row-major order) with the bs^2 block offsets by tiling both lists to n * bs^2 rows, so seed j
    only gets the offsets o with o = j (mod gcd(n, bs^2)), plus its own cell, copied in at offset
    ((bs-1)//2, (bs-1)//2) by the padding (resnet.py:56-57, 79). Whenever n shares a factor with
    bs^2 (bs = 2: every even n) the blocks are incomplete and less is dropped.
    """

    MASKS = ("rfs", "full")

    def __init__(self, block_size: int, mask: str = "rfs"):
        super().__init__()
        if mask not in self.MASKS:
            raise ValueError(f"DropBlock mask must be one of {self.MASKS}, got {mask!r}")
        self.block_size = block_size
        self.mask = mask

    def block_mask(self, seeds: torch.Tensor) -> torch.Tensor:
        """1 where kept, 0 where dropped; seeds (B, C, H - bs + 1, W - bs + 1) -> (B, C, H, W)."""
        bs = self.block_size
        if self.mask == "full":
            return 1.0 - F.max_pool2d(F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1)
        lead = (bs - 1) // 2
        covered = F.pad(seeds, (lead, bs // 2, lead, bs // 2))
        flat = seeds.flatten() > 0
        order = torch.cumsum(flat, 0) - 1  # each seed's position in row-major (nonzero()) order
        period = torch.gcd(flat.sum(), torch.tensor(bs * bs, device=seeds.device))
        for offset in range(bs * bs):  # computed on the device: no host synchronisation
            row, col = divmod(offset, bs)
            paired = (flat & ((order - offset) % period == 0)).view_as(seeds).to(seeds.dtype)
            covered = torch.maximum(covered, F.pad(paired, (col, bs - 1 - col, row, bs - 1 - row)))
        return 1.0 - covered

    def forward(self, x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        bs, size = self.block_size, x.shape[2]
        gamma = rate / bs ** 2 * size ** 2 / (size - bs + 1) ** 2  # resnet.py:141
        grid = (x.shape[0], x.shape[1], x.shape[2] - bs + 1, x.shape[3] - bs + 1)
        mask = self.block_mask(torch.bernoulli(gamma.to(x.dtype).expand(grid)))
        return mask * x * (mask.numel() / mask.sum().clamp_min(1.0))  # resnet.py:48-51


class Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, drop_rate: float, block_size: int | None, mask: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.maxpool = nn.MaxPool2d(2)
        self.drop_rate = drop_rate
        self.DropBlock = DropBlock(block_size, mask) if block_size else None

    def forward(self, x: torch.Tensor, dropblock_rate: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if self.DropBlock is not None:
            return self.DropBlock(out, dropblock_rate)
        return F.dropout(out, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else out


class ResNet12(nn.Module):
    def __init__(self, num_classes: int, widths=(64, 160, 320, 640), drop_rate: float = 0.1,
                 dropblock_size: int = 5, dropblock_ramp_steps: int = 40_000, dropblock_mask: str = "rfs",
                 in_channels: int = 3):
        super().__init__()
        if num_classes < 2 or len(widths) != 4 or not 0.0 <= drop_rate < 1.0 or dropblock_size < 1:
            raise ValueError(f"need num_classes >= 2, 4 widths, 0 <= drop_rate < 1 and dropblock_size >= 1; got "
                             f"{num_classes}, {widths}, {drop_rate}, {dropblock_size}")
        planes = (in_channels, *widths)
        for i in range(4):  # DropBlock in blocks 3 and 4 (resnet.py:161-164)
            block = Block(planes[i], planes[i + 1], drop_rate, dropblock_size if i >= 2 else None, dropblock_mask)
            self.add_module(f"layer{i + 1}", nn.Sequential(block))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.drop_rate = drop_rate
        self.dropblock_ramp_steps = dropblock_ramp_steps
        self.register_buffer("dropblock_step", torch.zeros((), dtype=torch.int64))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def dropblock_rate(self) -> torch.Tensor:
        """The DropBlock drop rate of the current pass: drop_rate * min(1, step / ramp_steps)."""
        if self.dropblock_ramp_steps <= 0:
            return torch.tensor(self.drop_rate, device=self.dropblock_step.device)
        progress = (self.dropblock_step.float() / self.dropblock_ramp_steps).clamp(max=1.0)
        return self.drop_rate * progress

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self.dropblock_step += 1  # RFS counts before computing the rate (resnet.py:114, 140)
        rate = self.dropblock_rate()
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer[0](x, rate)
        features = self.avgpool(x).flatten(1)
        return features, self.classifier(features)


def resnet12(num_classes: int = 64, **kw) -> ResNet12:
    return ResNet12(num_classes, **kw)
