"""Class-folder image trees `<root>/<split>/<class>/<file>`: one mechanism for every folder dataset.

Every split is listed through the cached file index (`opl.data.folder_index`). Class ids of all
splits come from ONE class list: a dataset's fixed list (e.g. timm's ImageNet-1k synsets) or else
the training split's sorted class-folder names (as torchvision's ImageFolder). A split lacking a
class folder, holding an extra one, or with an empty one is an error naming the folders, never a
silent renumbering. `DataSpec.fingerprint` is `<files>:<hash>` over the relative paths and sizes
of every file read, so a run on other files never passes for a run on these.

Two ways to hold the pixels:
- `image_folder` (dataset=imagenet, dataset=imagefolder): a map-style Dataset per split whose
  workers decode each image and crop it to uint8 (3, S, S) with the geometric part of torchvision's
  reference recipe (pytorch/vision references/classification/presets.py); the flip and the
  normalisation happen on the device (`DataSpec.augment` + BatchAugment).
- `cifar10_jpg`: small images decoded once into memory (`ImageTensors`).
"""

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from opl.data.base import DataSpec, ImageTensors
from opl.data.folder_index import SplitIndex, list_split
from opl.data.prepare import build_spec
from opl.errors import ConfigError, DatasetNotFoundError


# ------------------------------------------------------------------------------------ reading
def read_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The decoded image in `mode`; an unreadable or truncated file is an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert loads every pixel: truncation surfaces here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetNotFoundError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None


def _shorten(names: Sequence[str], shown: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def class_labels(index: SplitIndex, class_list: Sequence[str], source: str) -> np.ndarray:
    """Each file's class id in `class_list`; the split must hold exactly those class folders, none empty."""
    present = set(index.classes)
    wanted = set(class_list)
    problems = []
    if missing := [c for c in class_list if c not in present]:
        problems.append(f"missing {_shorten(missing)}")
    if extra := [c for c in index.classes if c not in wanted]:
        problems.append(f"extra {_shorten(extra)}")
    if empty := [c for c, n in zip(index.classes, index.counts) if n == 0 and c in wanted]:
        problems.append(f"without images {_shorten(empty)}")
    if problems:
        raise DatasetNotFoundError(f"{index.path}: class folders do not match {source}: {'; '.join(problems)} "
                                   "(every split needs the same class folders, each holding images)")
    position = {name: i for i, name in enumerate(class_list)}
    return np.asarray([position[c] for c in index.classes], dtype=np.int64)[index.class_positions()]


def fixed_class_list(classes: str | None) -> list[str] | None:
    """A dataset's own class list by name (timm's ImageNet synset lists, e.g. "imagenet-1k"), or None."""
    if classes is None:
        return None
    from timm.data import ImageNetInfo  # imported only for datasets that name a timm list

    try:
        return list(ImageNetInfo(classes).label_names())
    except (AssertionError, KeyError, FileNotFoundError, ValueError):
        raise ConfigError(f"dataset.classes={classes!r} is not a class list timm knows (e.g. imagenet-1k)") from None


def fingerprint(indexes: dict[str, SplitIndex], list_files: Sequence[Path] = ()) -> str:
    """`<files>:<hash>` of the relative paths and sizes of every image read (splits by folder name)
    and of the contents of small list files read beside them (e.g. a sample-order index)."""
    h = hashlib.sha256()
    for folder in sorted(indexes):
        h.update(f"{folder}\0{len(indexes[folder])}\0{indexes[folder].digest}\n".encode())
    for path in sorted(list_files):
        h.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return f"{sum(len(i) for i in indexes.values()) + len(list_files)}:{h.hexdigest()[:16]}"


def list_splits(root: Path, folders: dict[str, str], class_list: list[str] | None, num_classes: int,
                cache_dir: str | None, missing_message) -> tuple[dict[str, SplitIndex], dict[str, np.ndarray]]:
    """Index and labels of each split folder {split: folder}; class ids from one list (else train's)."""
    for folder in folders.values():
        if not (root / folder).is_dir():
            raise DatasetNotFoundError(missing_message(root / folder))
    indexes = {split: list_split(root / folder, cache_dir) for split, folder in folders.items()}
    source = "the dataset's class list"
    if class_list is None:
        class_list, source = list(indexes["train"].classes), f"the training split {indexes['train'].path}"
        if len(class_list) != num_classes:
            raise DatasetNotFoundError(f"{indexes['train'].path} has {len(class_list)} class folders "
                                       f"({_shorten(class_list, 3)}), dataset.num_classes is {num_classes}")
    labels = {split: class_labels(index, class_list, source) for split, index in indexes.items()}
    return indexes, labels


# ------------------------------------------------------------------------------------ streamed folders
# What to do when a known dataset's tree is absent (dataset name -> advice, appended to the error).
PREPARE_HINTS = {
    "imagenet": "The validation images must first be sorted into <wnid> class folders, e.g. with valprep.sh "
                "(github.com/soumith/imagenetloader.torch) or imagenet/extract_ILSVRC.sh of pytorch/examples; "
                "see docs/imagenet.md.",
}


def eval_resize(image_size: int, eval_crop_ratio: float) -> int:
    """Shorter side before the centre crop: 224 -> 256 at the reference ratio 224/256."""
    return round(image_size / eval_crop_ratio)


def folder_transform(train: bool, image_size: int, eval_crop_ratio: float = 0.875,
                     train_crop_scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """PIL image -> uint8 (3, S, S): the geometric steps of ClassificationPresetTrain / ...Eval in
    pytorch/vision references/classification/presets.py (bilinear). The reference's flip follows
    on the device (AugmentSpec(hflip=True)), then ToTensor-scaling and Normalize (BatchAugment)."""
    if train:
        steps = [T.RandomResizedCrop(image_size, scale=tuple(train_crop_scale),
                                     interpolation=T.InterpolationMode.BILINEAR)]
    else:
        steps = [T.Resize(eval_resize(image_size, eval_crop_ratio), interpolation=T.InterpolationMode.BILINEAR),
                 T.CenterCrop(image_size)]
    return T.Compose(steps + [T.PILToTensor()])


class FolderImages(Dataset):
    """Items `(uint8 (3, S, S), label)` of one split folder, decoded and cropped in the worker."""

    def __init__(self, index: SplitIndex, labels: np.ndarray, transform):
        # numpy arrays, not lists of Python objects: forked workers share them without copying.
        self.index, self.labels, self.transform = index, labels, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.index.file_path(i))), int(self.labels[i])


def image_folder(
    root: str | None,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: dict,
    image_size: int,
    name: str = "imagefolder",
    variant: str | None = None,
    classes: str | None = None,
    train_split: str = "train",
    test_split: str = "val",
    val_split: str | None = None,
    eval_crop_ratio: float = 0.875,
    train_crop_scale: Sequence[float] = (0.08, 1.0),
    index_cache: str | None = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """Any class-folder tree `<root>/<split>/<class>/<image>` streamed from disk (ImageNet included).

    `variant` defaults to "imagefolder/<root folder name>"; "|size=S|resize=R" is appended. The
    tree itself is identified by `DataSpec.fingerprint`, not by its path. `index_cache` overrides
    the file-index cache folder ($OPL_CACHE_DIR, ...); it is no config key, as a machine-local path
    must not enter a run's identity.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"dataset.image_size must be a positive integer, got {image_size!r}")
    if not 0 < eval_crop_ratio <= 1:
        raise ConfigError(f"dataset.eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
    folders = {"train": train_split, "test": test_split} | ({"val": val_split} if val_split else {})
    if len(set(folders.values())) != len(folders):
        raise ConfigError(f"dataset split folders must differ, got {folders}")
    layout = " and ".join(f"<root>/{f}/<class>/<image>" for f in folders.values())
    if not root:
        raise DatasetNotFoundError(f"dataset.root is not set: pass dataset.root=DIR holding {layout}")
    root_path = Path(root).expanduser()

    def missing(split_dir: Path) -> str:
        return (f"no {name} at {root_path}: {split_dir} is not a folder; expected {layout} "
                f"({num_classes} class folders each). {PREPARE_HINTS.get(name, '')}").strip()

    class_list = fixed_class_list(classes)
    if class_list is not None and len(class_list) != num_classes:
        raise ConfigError(f"dataset.classes={classes} lists {len(class_list)} classes, dataset.num_classes is {num_classes}")
    indexes, labels = list_splits(root_path, folders, class_list, num_classes, index_cache, missing)
    splits = {split: FolderImages(indexes[split], labels[split],
                                  folder_transform(split == "train", image_size, eval_crop_ratio, train_crop_scale))
              for split in folders}
    variant = variant or f"imagefolder/{root_path.resolve().name}"
    variant += f"|size={image_size}|resize={eval_resize(image_size, eval_crop_ratio)}"
    spec = build_spec(name, variant, num_classes, splits["train"], splits["test"], mean, std, augment, val_fraction,
                      split_seed, limit_train, limit_test, val=splits.get("val"),
                      fingerprint=fingerprint({f: indexes[s] for s, f in folders.items()}))
    if val_fraction:  # the held-out part of train is evaluated: eval transforms, same files
        train_eval = FolderImages(indexes["train"], labels["train"],
                                  folder_transform(False, image_size, eval_crop_ratio))
        spec = spec.with_splits(val=Subset(train_eval, spec.val.indices))
    return spec


# ------------------------------------------------------------------------------------ in memory
def canonical_order(index: SplitIndex, labels: np.ndarray, folder: str, index_csv: Path) -> np.ndarray:
    """Positions of `index`'s files in the order of the index file's rows for `folder`, labels checked."""
    position = {f"{folder}/{index.relpath(i)}": i for i in range(len(index))}
    order = []
    with open(index_csv, newline="") as f:
        rows = csv.DictReader(f)
        for row in rows:
            if row["split"] != folder:
                continue
            i = position.get(row["jpg_path"])
            if i is None or labels[i] != int(row["label"]):
                raise DatasetNotFoundError(f"{index_csv}:{rows.line_num}: {row['jpg_path']} with label {row['label']} "
                                           f"does not match the files under {index.path}")
            order.append(i)
    if len(set(order)) != len(index) or len(order) != len(index):
        raise DatasetNotFoundError(f"{index_csv} lists {len(order)} {folder} images ({len(set(order))} distinct), "
                                   f"{index.path} has {len(index)}")
    return np.asarray(order, dtype=np.int64)


def decode_to_tensors(index: SplitIndex, labels: np.ndarray, order: np.ndarray, mode: str = "RGB") -> ImageTensors:
    arrays = [np.asarray(read_image(index.file_path(int(i)), mode)) for i in order]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetNotFoundError(f"images under {index.path} differ in size ({sorted(shapes)[:3]}...); "
                                   "in-memory loading needs one size")
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return ImageTensors(images.contiguous(), torch.from_numpy(labels[order]))


def _archive_hint(root: Path) -> str:
    if root.is_file() or root.with_suffix("").exists() or str(root).endswith((".tar.gz", ".tgz")):
        return (f" If you have the archive, extract it first: mkdir -p DIR && tar xzf {root} -C DIR, "
                "then set dataset.root=DIR.")
    return ""


def cifar10_jpg(
    root: str,
    num_classes: int,
    mean: list[float],
    std: list[float],
    augment: dict,
    index_file: str | None = "cifar10_canonical_index.csv",
    index_cache: str | None = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """CIFAR-10 stored as JPEG class folders (pixels differ from the original data; labels exact).

    Class ids follow the training split's sorted folder names (for CIFAR-10 the official ids); the
    optional index file restores torchvision's sample order and is part of the fingerprint.
    """
    if not root:
        raise DatasetNotFoundError(
            "dataset.root is not set. Extract cifar10-jpg.tar.gz (e.g. mkdir -p data/cifar10-jpg && tar xzf "
            "cifar10-jpg.tar.gz -C data/cifar10-jpg) and pass dataset.root=data/cifar10-jpg"
        )
    root_path = Path(root).expanduser()
    folders = {"train": "train", "test": "test"}

    def missing(split_dir: Path) -> str:
        return f"expected a class-folder tree at {split_dir}/<class>/<image>.{_archive_hint(root_path)}"

    indexes, labels = list_splits(root_path, folders, None, num_classes, index_cache, missing)
    index_csv = root_path / index_file if index_file else None
    has_csv = index_csv is not None and index_csv.is_file()
    splits = {}
    for split, folder in folders.items():
        order = (canonical_order(indexes[split], labels[split], folder, index_csv) if has_csv
                 else np.arange(len(indexes[split])))
        splits[split] = decode_to_tensors(indexes[split], labels[split], order)
    return build_spec("cifar10_jpg", "cifar10/jpeg-q75", num_classes, splits["train"], splits["test"], mean, std,
                      augment, val_fraction, split_seed, limit_train, limit_test,
                      fingerprint=fingerprint(indexes, [index_csv] if has_csv else []))
