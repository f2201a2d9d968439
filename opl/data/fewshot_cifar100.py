"""CIFAR-FS and FC100 built from torchvision's `cifar-100-python/` files, with the class splits
pinned in `fewshot_splits.yaml` (sources cited there), so that CIFAR-100 is all a user needs.

Each split holds every CIFAR-100 image (train then test file, file order) of its classes: 600 per
class, as in the released CIFAR-FS / FC100 pickles. `raw_labels` are the CIFAR-100 fine ids, the
same ids RFS's pickles store.
"""

import functools
import pickle
from pathlib import Path

import numpy as np
import torch
import yaml

from opl.data.cifar import LAYOUT, ensure_cifar, read_cifar_batches
from opl.data.fewshot_formats import SplitArrays
from opl.errors import DatasetNotFoundError

SPLITS_FILE = Path(__file__).with_name("fewshot_splits.yaml")
BENCHMARKS = ("cifar_fs", "fc100")


@functools.cache
def pinned_splits() -> dict:
    with open(SPLITS_FILE) as f:
        return yaml.safe_load(f)


def fine_label_names() -> list[str]:
    return list(pinned_splits()["cifar100"]["fine_label_names"])


def split_class_names(benchmark: str) -> dict[str, list[str]]:
    """{'train' | 'val' | 'test': CIFAR-100 class names} of CIFAR-FS or FC100."""
    splits = pinned_splits()
    if benchmark == "cifar_fs":
        return {split: list(names) for split, names in splits["cifar_fs"]["classes"].items()}
    if benchmark == "fc100":
        members = splits["cifar100"]["superclasses"]
        return {split: [name for superclass in supers for name in members[superclass]]
                for split, supers in splits["fc100"]["superclasses"].items()}
    raise ValueError(f"unknown CIFAR-100 few-shot benchmark {benchmark!r}; choose from {BENCHMARKS}")


def split_class_ids(benchmark: str) -> dict[str, list[int]]:
    """{'train' | 'val' | 'test': sorted CIFAR-100 fine ids}."""
    index = {name: i for i, name in enumerate(fine_label_names())}
    return {split: sorted(index[name] for name in names) for split, names in split_class_names(benchmark).items()}


def check_meta(folder: Path) -> Path:
    """The CIFAR-100 class names must be the ones the splits are written in."""
    path = folder / "meta"
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path} (CIFAR-100 class names; part of torchvision's download)")
    with open(path, "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if names is None:
        raise DatasetNotFoundError(f"{path}: key 'fine_label_names' missing")
    if list(names) != fine_label_names():
        raise DatasetNotFoundError(f"{path} key 'fine_label_names' differs from CIFAR-100's 100 class names "
                                   f"pinned in {SPLITS_FILE.name}: not the original CIFAR-100")
    return path


def build_from_cifar100(benchmark: str, root: str | Path, download: bool = False) -> dict[str, SplitArrays]:
    """{'train' | 'val' | 'test': that split's images} from `root/cifar-100-python/`."""
    ids = split_class_ids(benchmark)
    folder = ensure_cifar("cifar100", root, download)
    meta = check_meta(folder)
    layout = LAYOUT["cifar100"]
    parts = [read_cifar_batches(folder, layout[name], layout["label_key"]) for name in ("train", "test")]
    images = torch.cat([part.images for part in parts])
    fine = torch.cat([part.labels for part in parts]).numpy()
    files = tuple(folder / name for name in layout["train"] + layout["test"]) + (meta,)
    splits = {}
    for split, class_ids in ids.items():
        index = np.flatnonzero(np.isin(fine, class_ids))
        splits[split] = SplitArrays(images[torch.from_numpy(index)], fine[index], files, folder)
    return splits
