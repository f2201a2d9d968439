"""What every dataset builder returns: in-memory uint8 splits plus how to augment and normalise them."""

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class AugmentSpec:
    """Per-sample training augmentation, applied in this order (the authors' CIFAR pipeline)."""

    crop_padding: int = 0  # RandomCrop(size, padding=crop_padding) with zero fill; 0 disables
    hflip: bool = False  # RandomHorizontalFlip(p=0.5)
    brightness: float = 0.0  # ColorJitter factors, each drawn from [max(0, 1-x), 1+x]
    contrast: float = 0.0
    saturation: float = 0.0
    # Each training batch followed by its horizontally mirrored copy (2B samples, labels and indices
    # repeated), after the per-sample augmentation: the RSC code's training loop (docs/pacs.md).
    mirror_batch: bool = False

    @property
    def jitter(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0


@dataclass
class ImageTensors:
    """A split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: np.ndarray) -> "ImageTensors":
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageTensors(self.images[index], self.labels[index])


# A split is either resident in memory (CIFAR-sized data) or a map-style Dataset (large folder
# datasets) whose items are `(uint8 tensor (C, H, W), label)` of one size per split: workers decode
# and apply the geometric / PIL-level transforms, the loader moves uint8 batches to the device and
# `BatchAugment` (with `DataSpec.augment`) finishes them there and normalises, for both kinds.
Split = ImageTensors | Dataset


@dataclass
class DataSpec:
    name: str
    # Identifies the exact data a number was obtained on (e.g. JPEG vs original pixels, subsets);
    # results from different variants are never compared as the same cell.
    variant: str
    num_classes: int
    train: Split
    test: Split
    val: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    # Facts about the data worth keeping with the results (e.g. the realised label-noise rate).
    notes: dict = field(default_factory=dict)
    # A short hash of what was read (e.g. file count, sorted relative paths and sizes), so a run
    # on other files under the same settings never resumes or skips into an old run folder.
    fingerprint: str | None = None
    # Few-shot benchmarks: novel-class images (labels 0..C-1 of their own classes) that episodes are
    # drawn from, keyed "val" (model selection) and "test" (the reported number). `train` / `val` /
    # `test` above then hold base-class images only.
    episode_pools: dict[str, ImageTensors] = field(default_factory=dict)

    def with_splits(self, **splits) -> "DataSpec":
        return replace(self, **splits)
