"""Seeded index splits: the authors' validation split and training subsets."""

import numpy as np


def validation_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) as in the authors' CIFAR loader: shuffle range(n) with a seeded
    NumPy RandomState and take the first floor(fraction * n) indices for validation."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    split = int(np.floor(fraction * n))
    return indices[split:], indices[:split]


def seeded_subset(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """`limit` distinct indices of range(n), drawn with a seed, kept in ascending order."""
    if not 0 < limit <= n:
        raise ValueError(f"subset size must be in 1..{n}, got {limit}")
    return np.sort(np.random.RandomState(seed).permutation(n)[:limit])
