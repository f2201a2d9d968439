"""Class-folder image trees (`<split>/<class>/<file>`), decoded into memory when images are small.

`cifar10_jpg` reads the CIFAR-10 JPEG tree (`train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`,
optional `cifar10_canonical_index.csv` restoring torchvision's sample order). Class ids follow
sorted folder names, as torchvision's ImageFolder does (for CIFAR-10 this equals the official ids).
"""

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opl.data.base import DataSpec, ImageTensors
from opl.data.prepare import build_spec
from opl.errors import DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_class_folders(split_dir: Path) -> list[tuple[Path, int]]:
    """(path, class id) for every image, in sorted order; ids from sorted class-folder names."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((split_dir / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise DatasetNotFoundError(f"no images under {split_dir}/<class>/ (extensions {IMAGE_EXTENSIONS})")
    return samples


def canonical_order(root: Path, split: str, samples: list[tuple[Path, int]], index_csv: Path) -> list[tuple[Path, int]]:
    """Reorder `samples` by the index file's rows for `split`, checking its labels on the way."""
    by_path = {path.relative_to(root).as_posix(): (path, label) for path, label in samples}
    ordered = []
    with open(index_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != split:
                continue
            path, label = by_path.get(row["jpg_path"], (None, None))
            if path is None or label != int(row["label"]):
                raise DatasetNotFoundError(f"{index_csv}: row {row} does not match the files under {root}")
            ordered.append((path, label))
    if len(ordered) != len(samples):
        raise DatasetNotFoundError(f"{index_csv} lists {len(ordered)} {split} images, the folder has {len(samples)}")
    return ordered


def decode_to_tensors(samples: list[tuple[Path, int]], mode: str = "RGB") -> ImageTensors:
    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))

    arrays = [decode(path) for path, _ in samples]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetNotFoundError(f"images differ in size ({sorted(shapes)[:3]}...); in-memory loading needs one size")
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return ImageTensors(images.contiguous(), torch.tensor([label for _, label in samples]))


def load_split_folder(root: Path, split: str, index_csv: Path | None) -> ImageTensors:
    split_dir = root / split
    if not split_dir.is_dir():
        hint = ""
        if root.is_file() or root.with_suffix("").exists() or str(root).endswith((".tar.gz", ".tgz")):
            hint = f" If you have the archive, extract it first: mkdir -p DIR && tar xzf {root} -C DIR, then set dataset.root=DIR."
        raise DatasetNotFoundError(f"expected a class-folder tree at {split_dir}/<class>/<image>.{hint}")
    samples = list_class_folders(split_dir)
    if index_csv is not None and index_csv.is_file():
        samples = canonical_order(root, split, samples, index_csv)
    return decode_to_tensors(samples)


def cifar10_jpg(
    root: str,
    num_classes: int,
    mean: list[float],
    std: list[float],
    augment: dict,
    index_file: str = "cifar10_canonical_index.csv",
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """CIFAR-10 stored as JPEG class folders (pixels differ from the original data; labels exact)."""
    if not root:
        raise DatasetNotFoundError(
            "dataset.root is not set. Extract cifar10-jpg.tar.gz (e.g. mkdir -p data/cifar10-jpg && tar xzf "
            "cifar10-jpg.tar.gz -C data/cifar10-jpg) and pass dataset.root=data/cifar10-jpg"
        )
    root_path = Path(root).expanduser()
    train = load_split_folder(root_path, "train", root_path / index_file)
    test = load_split_folder(root_path, "test", root_path / index_file)
    if int(train.labels.max()) + 1 != num_classes:
        raise DatasetNotFoundError(f"{root_path}/train has {int(train.labels.max()) + 1} classes, config says {num_classes}")
    return build_spec("cifar10_jpg", "cifar10/jpeg-q75", num_classes, train, test, mean, std, augment,
                      val_fraction, split_seed, limit_train, limit_test)
