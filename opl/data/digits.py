"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes): no download."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

from opl.data.base import DataSpec, ImageTensors
from opl.data.prepare import build_spec
from opl.data.splits import validation_split
from opl.errors import DatasetNotFoundError


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits()`'s images (1797, 8, 8) float64 in 0..16 and int64 labels, read from the file it
    reads (sklearn/datasets/data/digits.csv.gz) without importing scikit-learn, which costs ~2 s."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise DatasetNotFoundError(f"scikit-learn's digits file is missing ({path or 'scikit-learn is not installed'}): "
                                   "pip install scikit-learn")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits(
    num_classes: int,
    mean: list[float],
    std: list[float],
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """A seeded train/test split of `load_digits()`; pixels 0..16 are rescaled to 0..255 uint8."""
    if num_classes != 10:
        raise ValueError(f"digits has 10 classes, config says {num_classes}")
    pixels, labels = bundled_digits()
    # The data read, as bytes: scikit-learn's arrays (a changed copy of the data gives another fingerprint).
    fingerprint = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float64).tobytes()
                                 + np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]
    images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    everything = ImageTensors(images, torch.from_numpy(labels))
    train_idx, test_idx = validation_split(len(everything), test_fraction, seed=0)  # fixed test set for every run
    return build_spec("digits", f"digits/sklearn|test={test_fraction}@0", num_classes, everything.subset(train_idx),
                      everything.subset(test_idx), mean, std, None, val_fraction, split_seed, limit_train, limit_test,
                      fingerprint=fingerprint)
