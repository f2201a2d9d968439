"""Readers for the few-shot files exactly as WangYueFt/rfs reads them.

Three layouts, each a function of a split tag (the names RFS passes as `partition`):

- `mini_pickle`: `miniImageNet_category_split_{tag}.pickle` (rfs dataset/mini_imagenet.py:42-50), a
  dict with `data` (N, 84, 84, 3) uint8 and `labels`, read with `pickle.load(f, encoding="latin1")`.
  Tags: train_phase_{train,val,test} (base classes), val / test (novel classes).
- `tiered_npz`: `{tag}_images.npz` key `images` + `{tag}_labels.pkl` key `labels`
  (rfs dataset/tiered_imagenet.py:43-56; the labels pickle is read with latin1 as in its
  `_load_labels` fallback, lines 99-110).
- `cifar_pickle`: `{tag}.pickle` with `data` (N, 32, 32, 3) and `labels` holding original CIFAR-100
  fine ids (rfs dataset/cifar.py:46-55).

Base-class ids follow RFS's training targets: mini / tiered subtract the smallest label
(mini_imagenet.py:79, tiered_imagenet.py:85); CIFAR-FS / FC100 number classes in order of first
appearance (cifar.py:56-66). Every missing file, key, wrong shape or dtype raises `DatasetNotFoundError`
naming the file and the key.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opl.errors import DatasetNotFoundError

FORMATS = ("mini_pickle", "tiered_npz", "cifar_pickle")
FORMAT_OF = {"mini_imagenet": "mini_pickle", "tiered_imagenet": "tiered_npz", "cifar_fs": "cifar_pickle",
             "fc100": "cifar_pickle"}


@dataclass
class SplitArrays:
    """One split as read: uint8 images (N, 3, H, W), the stored labels, and the files read."""

    images: torch.Tensor
    raw_labels: np.ndarray
    files: tuple[Path, ...]
    label_file: Path  # the file the labels came from, named in messages about them

    def __len__(self) -> int:
        return len(self.raw_labels)


def split_files(fmt: str, root: Path, tag: str) -> tuple[Path, ...]:
    """The files of split `tag` in layout `fmt` under `root`."""
    if fmt == "mini_pickle":
        return (root / f"miniImageNet_category_split_{tag}.pickle",)
    if fmt == "tiered_npz":
        return root / f"{tag}_images.npz", root / f"{tag}_labels.pkl"
    if fmt == "cifar_pickle":
        return (root / f"{tag}.pickle",)
    raise ValueError(f"unknown few-shot file format {fmt!r}; choose from {FORMATS}")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetNotFoundError(f"missing file {path}")


def _load_pickle(path: Path):
    _require_file(path)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as exc:
        raise DatasetNotFoundError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _key(obj, key: str, path: Path):
    if not isinstance(obj, dict):
        raise DatasetNotFoundError(f"{path}: expected a dict with key '{key}', got {type(obj).__name__}")
    if key not in obj:
        raise DatasetNotFoundError(f"{path}: key '{key}' missing (keys present: {sorted(map(str, obj))})")
    return obj[key]


def check_images(images, path: Path, key: str, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8, or an error naming the file, the key and what was found."""
    try:
        array = np.asarray(images)
    except ValueError as exc:  # ragged lists of arrays
        raise DatasetNotFoundError(f"{path} key '{key}': not an array of equal-sized images ({exc})") from exc
    if array.dtype != np.uint8:
        raise DatasetNotFoundError(f"{path} key '{key}': expected dtype uint8, got {array.dtype}")
    if array.ndim != 4 or array.shape[1:] != (size, size, 3):
        raise DatasetNotFoundError(f"{path} key '{key}': expected shape (N, {size}, {size}, 3), got {array.shape}")
    return array


def check_labels(labels, n: int, path: Path, key: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DatasetNotFoundError(f"{path} key '{key}': expected a 1-D list of integer labels, "
                                   f"got dtype {array.dtype} shape {array.shape}")
    if len(array) != n:
        raise DatasetNotFoundError(f"{path} key '{key}': {len(array)} labels for {n} images")
    return array.astype(np.int64)


def _read_npz_images(path: Path, size: int) -> np.ndarray:
    _require_file(path)
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise DatasetNotFoundError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetNotFoundError(f"{path} is a single array, not an .npz archive with key 'images'")
    with archive:
        if "images" not in archive.files:
            raise DatasetNotFoundError(f"{path}: key 'images' missing (keys present: {sorted(archive.files)})")
        try:
            images = archive["images"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetNotFoundError(f"{path} key 'images' cannot be read ({type(exc).__name__}: {exc})") from exc
    return check_images(images, path, "images", size)


def read_split(fmt: str, root: Path, tag: str, size: int) -> SplitArrays:
    """Read split `tag` of layout `fmt`, checking every key, shape and dtype."""
    files = split_files(fmt, Path(root), tag)
    if fmt == "tiered_npz":
        image_file, label_file = files
        images = _read_npz_images(image_file, size)
        labels = check_labels(_key(_load_pickle(label_file), "labels", label_file), len(images), label_file, "labels")
    else:
        (path,) = files
        content = _load_pickle(path)
        images = check_images(_key(content, "data", path), path, "data", size)
        labels = check_labels(_key(content, "labels", path), len(images), path, "labels")
    return SplitArrays(channels_first(images), labels, files, files[-1])


def channels_first(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) numpy -> contiguous (N, 3, H, W) torch, as `ImageTensors` holds images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def first_appearance_ids(raw_labels: np.ndarray) -> np.ndarray:
    """0..C-1 numbered in order of first appearance (rfs dataset/cifar.py:56-66)."""
    classes, first, inverse = np.unique(raw_labels, return_index=True, return_inverse=True)
    rank = np.empty(len(classes), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(classes))
    return rank[inverse.reshape(-1)]


def minus_min_ids(raw_labels: np.ndarray, where: str) -> np.ndarray:
    """label - min(label) (rfs mini_imagenet.py:79), which must give every id 0..C-1."""
    ids = raw_labels - raw_labels.min()
    if len(np.unique(ids)) != ids.max() + 1:
        raise DatasetNotFoundError(f"{where}: labels minus their minimum are not the contiguous ids 0..C-1 RFS "
                                   f"assumes ({len(np.unique(ids))} classes, largest id {ids.max()})")
    return ids


def class_ids(fmt: str, raw_labels: np.ndarray, where: str) -> np.ndarray:
    """The 0..C-1 class ids RFS trains and samples with, from the stored labels."""
    if fmt == "cifar_pickle":
        return first_appearance_ids(raw_labels)
    return minus_min_ids(raw_labels, where)
