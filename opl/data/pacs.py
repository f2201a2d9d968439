"""PACS (Li et al., ICCV 2017), leave-one-domain-out, read through its split lists.

Layout under `root`: `PACS/<domain>/<class>/<file>` and the lists `<folder>/<domain>_{train,crossval,
test}_kfold.txt` (lines `<domain>/<class>/<file> <label>`, labels 1..7), where <folder> is `splits`
(the corrected lists of the RSC code) or `splits_official` (as released). Training uses the three
source domains' train lists, validation their crossval lists, test the target domain's test list
(the whole domain). Every line is checked when read: a malformed line, a label outside 1..7 or not
matching its class folder, a missing image or a repeated image is an error naming the list file
and line. The two known defects of the official lists are dropped with a warning instead (see
docs/pacs.md for why).

Items are `(uint8 tensor (3, H, W), label)`: workers decode and apply the PIL transforms of the RSC
code; normalisation happens on the device (`DataSpec.augment` is empty). Each split also carries
the source domain of every sample (`domains`, indices into `domain_names`) for per-domain metrics.
"""

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from opl.data.base import AugmentSpec, DataSpec
from opl.data.folders import read_image
from opl.data.prepare import finalize
from opl.data.splits import seeded_subset
from opl.errors import ConfigError, DatasetNotFoundError

# Facts of the dataset (folder names and the label order of the list files), not choices.
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")  # labels 1..7 in the lists
LIST_FOLDERS = {"corrected": "splits", "official": "splits_official"}
# The two defective lines of the released art_painting crossval list (line 1 carries label 0; line 17
# repeats line 2, which should name pic_249.jpg). Only these are tolerated, and only for `official`.
KNOWN_OFFICIAL_DEFECTS = frozenset({
    ("art_painting_crossval_kfold.txt", 1, "art_painting/dog/pic_225.jpg 0"),
    ("art_painting_crossval_kfold.txt", 17, "art_painting/dog/pic_248.jpg 1"),
})


@dataclass(frozen=True)
class ListEntry:
    path: str  # relative to <root>/PACS
    label: int  # 0-based
    line: int
    size: int  # bytes, for the fingerprint


@dataclass(frozen=True)
class SplitList:
    file: Path
    domain: str
    entries: list[ListEntry]
    dropped: list[str]  # "file:line: text (reason)" for tolerated known defects
    digest: str  # sha256 of the file's bytes


def _check_line(text: str, number: int, domain: str, image_root: Path) -> ListEntry | str:
    """The entry a line names, or the reason it is wrong."""
    fields = text.split()
    if len(fields) != 2 or not re.fullmatch(r"-?[0-9]+", fields[1]):
        return f"malformed line {text!r}: expected '<domain>/<class>/<file> <label>'"
    path, label = fields[0], int(fields[1])
    if not 1 <= label <= len(CLASSES):
        return f"label {label} is outside 1..{len(CLASSES)} (1={CLASSES[0]} ... {len(CLASSES)}={CLASSES[-1]})"
    parts = path.split("/")
    if len(parts) != 3 or ".." in parts or parts[0] != domain:
        return f"{path} is not a '{domain}/<class>/<file>' path of this list's domain"
    if parts[1] != CLASSES[label - 1]:
        return f"{path} has label {label} ({CLASSES[label - 1]}) but lies in the {parts[1]} folder"
    try:
        size = (image_root / path).stat().st_size
    except FileNotFoundError:
        return f"{path} does not exist under {image_root}; check dataset.root (the folder holding PACS/)"
    return ListEntry(path, label - 1, number, size)


def read_split_list(list_file: Path, domain: str, image_root: Path, tolerated: frozenset = frozenset()) -> SplitList:
    """Every line of one list checked; lines in `tolerated` ((file name, line, text)) are dropped, not errors."""
    try:
        raw = list_file.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"split list {list_file} is missing; dataset.root must hold "
                                   f"PACS/ and the split list folders {sorted(LIST_FOLDERS.values())}") from None
    entries, dropped, first_line = [], [], {}
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        checked = _check_line(text, number, domain, image_root)
        if isinstance(checked, ListEntry) and checked.path in first_line:
            checked = f"{checked.path} repeats line {first_line[checked.path]}; an image may be listed once"
        if isinstance(checked, str):
            if (list_file.name, number, text) in tolerated:
                dropped.append(f"{list_file}:{number}: {text!r} dropped ({checked})")
                continue
            raise DatasetNotFoundError(f"{list_file}:{number}: {checked}")
        first_line[checked.path] = number
        entries.append(checked)
    if not entries:
        raise DatasetNotFoundError(f"{list_file} lists no images")
    return SplitList(list_file, domain, entries, dropped, hashlib.sha256(raw).hexdigest())


class PacsImages(Dataset):
    """One split: images decoded on access, `(uint8 (3, H, W), label)` items.

    `domains[i]` indexes `domain_names` (the domains present in this split, in PACS order).
    """

    def __init__(self, image_root: Path, paths: list[str], labels, domains, domain_names: tuple[str, ...], transform):
        self.image_root = Path(image_root)
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.domains = torch.as_tensor(domains, dtype=torch.int64)
        self.domain_names = tuple(domain_names)
        self.transform = transform

    @classmethod
    def from_lists(cls, image_root: Path, lists: list[SplitList], transform) -> "PacsImages":
        names = tuple(d for d in DOMAINS if d in {s.domain for s in lists})
        entries = [(e, names.index(s.domain)) for s in lists for e in s.entries]
        return cls(image_root, [e.path for e, _ in entries], [e.label for e, _ in entries],
                   [d for _, d in entries], names, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(read_image(self.image_root / self.paths[i])), int(self.labels[i])

    def subset(self, index) -> "PacsImages":
        index = np.asarray(index, dtype=np.int64)
        return PacsImages(self.image_root, [self.paths[i] for i in index], self.labels[index], self.domains[index],
                          self.domain_names, self.transform)


def rsc_train_transform(image_size: int, crop_scale, crop_ratio, hflip: float, brightness: float, contrast: float,
                    saturation: float, hue: float, grayscale: float) -> T.Compose:
    """The RSC code's training pipeline on PIL images, ending in uint8 (normalisation on the device)."""
    steps = [T.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio))]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if max(brightness, contrast, saturation, hue) > 0:
        steps.append(T.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
    if grayscale > 0:
        steps.append(T.RandomGrayscale(grayscale))
    return T.Compose(steps + [T.PILToTensor()])


def rsc_eval_transform(image_size: int) -> T.Compose:
    """The RSC code's validation / test pipeline: a plain resize to a square, ending in uint8."""
    return T.Compose([T.Resize((image_size, image_size)), T.PILToTensor()])


def _fingerprint(lists: list[SplitList]) -> str:
    digest = hashlib.sha256()
    for split_list in lists:
        digest.update(f"{split_list.file.parent.name}/{split_list.file.name} {split_list.digest}\n".encode())
    for path, size in sorted({(e.path, e.size) for s in lists for e in s.entries}):
        digest.update(f"{path} {size}\n".encode())
    return digest.hexdigest()[:16]


def _check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"dataset.{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def _disjoint(train: SplitList, val: SplitList) -> None:
    train_lines = {e.path: e.line for e in train.entries}
    for e in val.entries:
        if e.path in train_lines:
            raise DatasetNotFoundError(f"{val.file}:{e.line}: {e.path} is also in {train.file}:{train_lines[e.path]}; "
                                       "train and crossval lists must not share images")


def pacs(
    root: str | None,
    target: str,
    splits: str = "corrected",
    *,
    image_size: int,
    num_classes: int,
    mean: list[float],
    std: list[float],
    train_transform: dict,
    mirror_batch: bool = False,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    limit_val: int | None = None,
) -> DataSpec:
    """PACS with `target` held out: train / val = the other three domains' train / crossval lists,
    test = the target's whole test list. `train_transform` holds `rsc_train_transform`'s keywords
    (values in configs/dataset/pacs.yaml, with their sources). `limit_*` keep seeded subsets (quick
    checks only), each named in the variant."""
    _check_choice("target", target, DOMAINS)
    _check_choice("splits", splits, tuple(LIST_FOLDERS))
    if num_classes != len(CLASSES):
        raise ConfigError(f"dataset.num_classes={num_classes}, but PACS has {len(CLASSES)} classes")
    if not root:
        raise DatasetNotFoundError("dataset.root is not set: pass the folder holding PACS/<domain>/<class>/ and "
                                   "the split lists, e.g. dataset.root=../shared/data/pacs")
    root_path = Path(root).expanduser()
    image_root, list_dir = root_path / "PACS", root_path / LIST_FOLDERS[splits]
    if not image_root.is_dir():
        raise DatasetNotFoundError(f"no PACS images at {image_root}: dataset.root must hold PACS/<domain>/<class>/<file>")
    tolerated = KNOWN_OFFICIAL_DEFECTS if splits == "official" else frozenset()

    def read(domain: str, part: str) -> SplitList:
        return read_split_list(list_dir / f"{domain}_{part}_kfold.txt", domain, image_root, tolerated)

    sources = [d for d in DOMAINS if d != target]
    train_lists = [read(d, "train") for d in sources]
    val_lists = [read(d, "crossval") for d in sources]
    test_lists = [read(target, "test")]
    for train_list, val_list in zip(train_lists, val_lists):
        _disjoint(train_list, val_list)
    lists = train_lists + val_lists + test_lists
    dropped = [line for s in lists for line in s.dropped]
    if dropped:
        warnings.warn(f"PACS {splits} lists: {len(dropped)} known defective line(s) dropped: " + "; ".join(dropped)
                      + " (dataset.splits=corrected uses the fixed lists)", stacklevel=2)

    train_tf = rsc_train_transform(image_size, **train_transform)
    test_tf = rsc_eval_transform(image_size)
    spec = DataSpec(
        name="pacs",
        variant=f"pacs/{splits}|target={target}|size={image_size}",
        num_classes=num_classes,
        train=PacsImages.from_lists(image_root, train_lists, train_tf),
        val=PacsImages.from_lists(image_root, val_lists, test_tf),
        test=PacsImages.from_lists(image_root, test_lists, test_tf),
        mean=tuple(mean),
        std=tuple(std),
        augment=AugmentSpec(mirror_batch=mirror_batch),
        notes={"target": target, "sources": sources, "splits": splits, "dropped_list_lines": dropped},
        fingerprint=_fingerprint(lists),
    )
    spec = finalize(spec, 0.0, split_seed, limit_train, limit_test)
    if limit_val is not None and limit_val < len(spec.val):
        # finalize's subsets cover train and test; PACS's own validation split is subset here.
        spec = spec.with_splits(val=spec.val.subset(seeded_subset(len(spec.val), limit_val, split_seed)),
                                variant=f"{spec.variant}|crossval={limit_val}@{split_seed}")
    return spec
