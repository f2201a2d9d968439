"""CIFAR-10 / CIFAR-100 in torchvision's python-pickle layout.

`root` holds `cifar-10-batches-py/` or `cifar-100-python/`, exactly as
`torchvision.datasets.CIFAR10/100(root, download=True)` leaves them. With `download=True` the
files are fetched through torchvision when missing; otherwise a missing folder is an error that
names the expected path and how to obtain it.
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from opl.data.base import DataSpec, ImageTensors
from opl.data.prepare import build_spec
from opl.errors import DatasetNotFoundError

LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "torchvision": "CIFAR100",
    },
}


def _missing_files(folder: Path, names: list[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def ensure_cifar(which: str, root: str | Path, download: bool) -> Path:
    """The folder with the pickles, downloading through torchvision if asked to."""
    layout = LAYOUT[which]
    root = Path(root).expanduser()
    folder = root / layout["folder"]
    names = layout["train"] + layout["test"]
    missing = _missing_files(folder, names)
    if missing and download:
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, layout["torchvision"])(str(root), train=True, download=True)
        except Exception as exc:  # network errors come in many types; the message says what happened
            raise DatasetNotFoundError(
                f"downloading {which} into {root} failed ({type(exc).__name__}: {exc}). On a machine "
                f"without internet, copy torchvision's '{layout['folder']}/' folder into {root} and run "
                f"again with dataset.download=false."
            ) from exc
        missing = _missing_files(folder, names)
    if missing:
        raise DatasetNotFoundError(
            f"{which} not found: expected {', '.join(str(folder / n) for n in missing)}. Set "
            f"dataset.root to the folder that contains '{layout['folder']}/', or pass "
            f"dataset.download=true to fetch it with torchvision."
        )
    return folder


def read_cifar_batches(folder: Path, names: list[str], label_key: str, digest=None) -> ImageTensors:
    """Concatenate pickled batches (`data`: N x 3072 uint8 channel planes) into (N, 3, 32, 32).
    `digest` (a hashlib object), when given, is updated with each file's name and bytes."""
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            raw = path.read_bytes()
            if digest is not None:
                digest.update(f"{name} {len(raw)}\n".encode())
                digest.update(raw)
            entry = pickle.loads(raw, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            batch_labels = np.asarray(entry[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise DatasetNotFoundError(f"{path} is not a CIFAR pickle with keys 'data' and '{label_key}': {exc!r}") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != data.shape[0]:
            raise DatasetNotFoundError(
                f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and {len(batch_labels)}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return ImageTensors(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(which: str, root: str | Path, download: bool = False) -> tuple[ImageTensors, ImageTensors, str]:
    """(train, test, fingerprint): the fingerprint hashes the names and bytes of the files read."""
    layout = LAYOUT[which]
    folder = ensure_cifar(which, root, download)
    digest = hashlib.sha256()
    train = read_cifar_batches(folder, layout["train"], layout["label_key"], digest)
    test = read_cifar_batches(folder, layout["test"], layout["label_key"], digest)
    for split in (train, test):
        if split.labels.min() < 0 or split.labels.max() >= layout["num_classes"]:
            raise DatasetNotFoundError(f"{folder}: labels outside 0..{layout['num_classes'] - 1}")
    return train, test, digest.hexdigest()[:16]


def cifar(
    which: str,
    root: str,
    num_classes: int,
    mean: list[float],
    std: list[float],
    augment: dict,
    download: bool = False,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """CIFAR-10/100 with the given normalisation and augmentation (values live in the configs)."""
    if which not in LAYOUT:
        raise ValueError(f"unknown CIFAR variant {which!r}; choose from {sorted(LAYOUT)}")
    if num_classes != LAYOUT[which]["num_classes"]:
        raise ValueError(f"{which} has {LAYOUT[which]['num_classes']} classes, config says {num_classes}")
    train, test, fingerprint = load_cifar(which, root, download)
    return build_spec(which, f"{which}/original", num_classes, train, test, mean, std, augment,
                      val_fraction, split_seed, limit_train, limit_test, fingerprint=fingerprint)
