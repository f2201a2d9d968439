"""Shared post-processing of every dataset: validation split, seeded subsets, variant label."""

from torch.utils.data import Subset

from opl.data.base import AugmentSpec, DataSpec, Split
from opl.data.splits import seeded_subset, validation_split


def _take(split: Split, index) -> Split:
    # Splits that know how to subset themselves keep their per-sample attributes (e.g. domains).
    return split.subset(index) if hasattr(split, "subset") else Subset(split, index.tolist())


def finalize(
    spec: DataSpec,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """Carve the seeded validation split out of train, then optionally subsample train / test.

    Every choice is appended to `variant` so that numbers from different data never mix.
    """
    variant, train, test, val = spec.variant, spec.train, spec.test, spec.val
    if val_fraction:
        if val is not None:
            raise ValueError(f"{spec.name} has its own validation split; val_fraction must be 0")
        train_idx, val_idx = validation_split(len(train), val_fraction, split_seed)
        train, val = _take(train, train_idx), _take(train, val_idx)
        variant += f"|val={val_fraction}@{split_seed}"
    if limit_train is not None and limit_train < len(train):
        train = _take(train, seeded_subset(len(train), limit_train, split_seed))
        variant += f"|train={limit_train}@{split_seed}"
    if limit_test is not None and limit_test < len(test):
        test = _take(test, seeded_subset(len(test), limit_test, split_seed))
        variant += f"|test={limit_test}@{split_seed}"
    return spec.with_splits(train=train, test=test, val=val, variant=variant)


def build_spec(name: str, variant: str, num_classes: int, train: Split, test: Split, mean, std,
               augment: dict | None = None, val_fraction: float = 0.0, split_seed: int = 0,
               limit_train: int | None = None, limit_test: int | None = None, val: Split | None = None,
               fingerprint: str | None = None) -> DataSpec:
    """A dataset from its train and test (and own validation) splits, finalised (validation split,
    subsets, variant). `fingerprint`: a short hash of what was read (`DataSpec.fingerprint`)."""
    spec = DataSpec(name=name, variant=variant, num_classes=num_classes, train=train, test=test, val=val,
                    mean=tuple(mean), std=tuple(std), augment=AugmentSpec(**(augment or {})), fingerprint=fingerprint)
    return finalize(spec, val_fraction, split_seed, limit_train, limit_test)
