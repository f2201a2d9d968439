"""Synthetic label noise on the training labels (paper.md section 3, label-noise recipe).

- "symmetric" (uniform): each label flips with probability `rate` to one of the other C-1
  classes, uniformly; a flipped label never stays the same.
- "pairflip" (class-dependent): label c flips to (c + 1) mod C with probability `rate`.

The noise is drawn once from its own seed, independent of the training seed, so every method and
training seed of a comparison sees the same noisy labels.
"""

from dataclasses import dataclass, replace

import torch

from opl.data.base import DataSpec, ImageTensors
from opl.errors import ConfigError

NOISE_KINDS = ("symmetric", "pairflip")


@dataclass(frozen=True)
class LabelNoise:
    kind: str
    rate: float
    seed: int = 0

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"label noise kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"label noise rate must be in [0, 1), got {self.rate}")

    @property
    def variant(self) -> str:
        return f"noise={self.kind}{self.rate}@{self.seed}"


def corrupt_labels(labels: torch.Tensor, num_classes: int, noise: LabelNoise) -> torch.Tensor:
    """A noisy copy of `labels` (int64, CPU); the input is not modified."""
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    labels = labels.to(torch.int64).cpu()
    g = torch.Generator().manual_seed(noise.seed)
    flip = torch.rand(labels.shape, generator=g) < noise.rate
    if noise.kind == "pairflip":
        target = (labels + 1) % num_classes
    else:
        # An offset in 1..C-1 added mod C picks one of the other classes uniformly.
        offset = torch.randint(1, num_classes, labels.shape, generator=g)
        target = (labels + offset) % num_classes
    return torch.where(flip, target, labels)


def transition_matrix(clean: torch.Tensor, noisy: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row-normalised empirical P(noisy = j | clean = i), float64."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    counts.index_put_((clean.long(), noisy.long()), torch.ones(len(clean), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def with_label_noise(spec: DataSpec, noise: LabelNoise) -> DataSpec:
    """`spec` with noisy training labels (validation and test stay clean); the realised rate goes
    into `notes["label_noise"]` and the noise into the data variant."""
    if not isinstance(spec.train, ImageTensors):
        raise ConfigError(f"label noise needs an in-memory training split; {spec.name} is a folder dataset")
    clean = spec.train.labels
    noisy = corrupt_labels(clean, spec.num_classes, noise)
    flipped = int((noisy != clean).sum())
    notes = dict(spec.notes, label_noise={
        "kind": noise.kind, "rate": noise.rate, "seed": noise.seed,
        "flipped": flipped, "train_samples": len(clean), "realised_rate": flipped / len(clean)})
    return replace(spec, train=ImageTensors(spec.train.images, noisy), variant=f"{spec.variant}|{noise.variant}",
                   notes=notes)
