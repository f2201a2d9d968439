"""A few-shot benchmark carved out of any class-folder image tree (`<split>/<class>/<image>`) by class
lists: pre-training on the base classes, episodes on the novel ones.

Made for a real-image episodic check where none of the few-shot benchmarks can be downloaded
(e.g. the CIFAR-10 JPEG copy: 6 base classes, 4 novel classes; configs/dataset/cifar10_fewshot_cpu.yaml).
The returned `DataSpec`, like the benchmarks' (`opl.data.fewshot`), has

    train                     base classes from `<root>/train`, ids 0..B-1 in `base_classes` order
    test                      base classes from `<root>/test`: held-out base images (classification)
    val                       None
    episode_pools["test"]     novel classes from `<root>/<pool_split>`, ids 0..V-1 in `novel_classes` order

Each part may be a seeded per-class subset (the first n of a seeded permutation of each class's
images, kept in file order). The variant names the source, both class lists and every subset;
the fingerprint hashes the relative paths and sizes (from the file index) of the files read.
"""

from pathlib import Path

import numpy as np

from opl.data.base import AugmentSpec, DataSpec
from opl.data.fewshot import listing_fingerprint
from opl.data.folder_index import SplitIndex, list_split
from opl.data.folders import decode_to_tensors
from opl.data.prepare import finalize
from opl.errors import ConfigError, DatasetNotFoundError


def _class_samples(root: Path, split: str, classes: list[str], per_class: int | None,
                   seed: int) -> tuple[SplitIndex, np.ndarray, np.ndarray]:
    """The split's file index, the positions in it of the chosen images (class by class in `classes`
    order, file order within a class) and every file's id in `classes` (-1: a class not chosen)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"expected a class-folder tree at {split_dir}/<class>/<image>; set dataset.root "
                                   "(docs/fewshot.md says how to extract the CIFAR-10 JPEG copy)")
    index = list_split(split_dir)
    folder_of_file = index.class_positions()
    labels = np.full(len(index), -1, dtype=np.int64)
    order = []
    for label, name in enumerate(classes):
        files = np.flatnonzero(folder_of_file == index.classes.index(name)) if name in index.classes else []
        if not len(files):
            held = sorted(c for c, n in zip(index.classes, index.counts) if n)
            raise DatasetNotFoundError(f"{split_dir}/{name}/ holds no images; the classes there are {held}")
        if per_class is not None:
            if per_class > len(files):
                raise ConfigError(f"{per_class} images per class asked, {split_dir}/{name}/ has {len(files)}")
            files = files[np.sort(np.random.RandomState(seed).permutation(len(files))[:per_class])]
        labels[files] = label
        order.append(files)
    return index, np.concatenate(order), labels


def _subset_tag(role: str, per_class: int | None, seed: int) -> str:
    return "" if per_class is None else f"|{role}={per_class}/class@{seed}"


def fewshot_folders(
    name: str,
    source: str,
    root: str,
    num_classes: int,
    base_classes: list[str],
    novel_classes: list[str],
    mean: list[float],
    std: list[float],
    augment: dict,
    pool_split: str = "test",
    base_train_per_class: int | None = None,
    base_test_per_class: int | None = None,
    novel_per_class: int | None = None,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """Base / novel splits of the class-folder tree at `root` (see the module docstring).

    source: names the tree in the variant (e.g. "cifar10/jpeg-q75"); num_classes: len(base_classes),
    stated in the config for the model's classifier.
    """
    base, novel = list(base_classes), list(novel_classes)
    if num_classes != len(base):
        raise ConfigError(f"dataset.num_classes={num_classes} but dataset.base_classes lists {len(base)} classes")
    if len(base) < 2 or len(novel) < 2 or set(base) & set(novel) or len(set(base)) < len(base) or len(set(novel)) < len(novel):
        raise ConfigError(f"dataset.base_classes and dataset.novel_classes must be disjoint lists of distinct classes, "
                          f"at least 2 each; got {base} and {novel}")
    root_path = Path(root).expanduser()
    parts = {
        "train": _class_samples(root_path, "train", base, base_train_per_class, split_seed),
        "test": _class_samples(root_path, "test", base, base_test_per_class, split_seed),
        "pool": _class_samples(root_path, pool_split, novel, novel_per_class, split_seed),
    }
    tensors = {role: decode_to_tensors(index, labels, order) for role, (index, order, labels) in parts.items()}
    sizes = {index.file_path(i): index.sizes[i] for index, order, _ in parts.values() for i in order.tolist()}
    variant = (f"{source}/fewshot/base={','.join(base)}/novel={','.join(novel)}@{pool_split}"
               + _subset_tag("base_train", base_train_per_class, split_seed)
               + _subset_tag("base_test", base_test_per_class, split_seed)
               + _subset_tag("novel", novel_per_class, split_seed))
    pool = tensors["pool"]
    spec = DataSpec(
        name=name, variant=variant, num_classes=num_classes, train=tensors["train"], test=tensors["test"], val=None,
        mean=tuple(mean), std=tuple(std), augment=AugmentSpec(**(augment or {})),
        notes={"base_classes": base, "novel_classes": novel,
               "episode_pools": {"test": {"images": len(pool), "classes": len(novel)}}},
        fingerprint=listing_fingerprint(sizes, root_path),
        episode_pools={"test": pool},
    )
    return finalize(spec, 0.0, split_seed, limit_train, limit_test)
