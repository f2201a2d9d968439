"""Few-shot fixtures shared by tests/test_fewshot_evaluator.py and tests/test_configs.py: RFS's
miniImageNet / tieredImageNet file layouts with few classes, and small in-memory benchmarks whose
classes differ in colour (so a network tells them apart)."""

import functools
from pathlib import Path

import numpy as np
import torch

from opl.data.base import AugmentSpec, DataSpec, ImageTensors
from opl.engine.trainer import Trainer, TrainerConfig
from opl.losses import ClassificationLoss
from opl.methods import StandardStep
from opl.models import ResNet12
from conftest import write_pickle

MINI_LAYOUT = {"train_phase_train": range(0, 4), "train_phase_val": range(0, 4), "train_phase_test": range(0, 4),
               "val": range(4, 9), "test": range(9, 14)}
TIERED_LAYOUT = {"train": range(10, 14), "val": range(14, 19), "test": range(19, 24)}
# What a test must override in configs/dataset/{mini_imagenet,tiered_imagenet}.yaml for these files.
SMALL_COUNTS = {"num_classes": 4, "classes": {"novel_val": 5, "novel_test": 5}, "images_per_class": None}


def colour_images(labels, size: int, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: class c's images share a colour (a fixed function of c) plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    palette = np.random.default_rng(1234).integers(30, 226, (int(labels.max()) + 1, 3))
    noise = rng.integers(-30, 31, (len(labels), size, size, 3))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_mini(root: Path, per_class: int = 4, size: int = 84) -> Path:
    """RFS's miniImageNet pickles: base classes 0..3, novel val 4..8, novel test 9..13."""
    root.mkdir(parents=True, exist_ok=True)
    for tag, classes in MINI_LAYOUT.items():
        labels = [c for c in classes for _ in range(per_class)]
        write_pickle(root / f"miniImageNet_category_split_{tag}.pickle",
                     {"data": colour_images(labels, size, seed=len(tag)), "labels": labels})
    return root


def write_tiered(root: Path, per_class: int = 4, size: int = 84) -> Path:
    """RFS's tieredImageNet files: {split}_images.npz + {split}_labels.pkl."""
    root.mkdir(parents=True, exist_ok=True)
    for tag, classes in TIERED_LAYOUT.items():
        labels = [c for c in classes for _ in range(per_class)]
        np.savez(root / f"{tag}_images.npz", images=colour_images(labels, size, seed=len(tag)))
        write_pickle(root / f"{tag}_labels.pkl", {"labels": labels})
    return root


def colour_benchmark(base: int = 4, novel: int = 6, per_class: int = 8, size: int = 32, augment=None) -> DataSpec:
    """An in-memory few-shot benchmark: base classes for training (and their test split), novel
    classes in two episode pools ("val": novel classes 0..novel-1 seen with one noise draw, "test":
    another draw of other colours)."""
    def split(first, count, seed):
        labels = np.repeat(np.arange(count), per_class)
        images = colour_images(labels + first, size, seed)
        return ImageTensors(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))

    augment = augment or AugmentSpec(crop_padding=4, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4)
    return DataSpec(name="colours", variant="colours", num_classes=base, train=split(0, base, 1),
                    test=split(0, base, 2), val=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=augment,
                    episode_pools={"val": split(base, novel, 3), "test": split(base + novel, novel, 4)})


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
TINY = dict(widths=(8, 16, 16, 32), dropblock_size=2)


def tiny_model(num_classes=4, seed=0, **kw):
    torch.manual_seed(seed)
    return ResNet12(num_classes, **{**TINY, **kw})


def make_trainer(run_dir, data, evaluators, criterion=None, epochs=1, seed=0, **cfg):
    step = StandardStep(tiny_model(data.num_classes, seed), criterion or ClassificationLoss())
    config = TrainerConfig(**{"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "device": "cpu",
                              "num_workers": 0, "progress": "line", "channels_last": False, **cfg})
    return Trainer(config, step, data, SGD, {"kind": "multistep", "milestones": []}, run_dir, seed=seed,
                   evaluators=evaluators)
