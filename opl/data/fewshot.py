"""Few-shot benchmarks (miniImageNet, tieredImageNet, CIFAR-FS, FC100) for RFS-style pre-training.

One builder, `fewshot`, for all four (values in configs/dataset/<name>.yaml). It returns a
`DataSpec` whose `train` holds the base classes (ids 0..C-1 as RFS numbers them), whose `val` /
`test` hold held-out base-class images where the files provide them, and whose `episode_pools`
hold the novel validation and test classes that episodes are drawn from (opl/eval/fewshot.py).

A split is named by its role, and `files` maps each role to the split tag of the RFS files
(`fewshot_formats.py`):

    train       base classes, pre-training                     DataSpec.train
    base_val    base classes held out (or null)                 DataSpec.val
    base_test   base classes held out, or the train tag where   DataSpec.test
                the files hold none (RFS then validates on train)
    novel_val   novel classes: episodes for model selection     DataSpec.episode_pools["val"]
    novel_test  novel classes: episodes for the reported number DataSpec.episode_pools["test"]

`read_fewshot` reads and checks everything, collecting one line per problem: the builder raises
the first, `scripts/verify_data.py` prints them all.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from opl.data.base import AugmentSpec, DataSpec, ImageTensors
from opl.data.fewshot_cifar100 import BENCHMARKS, build_from_cifar100, split_class_ids
from opl.data.fewshot_formats import FORMAT_OF, SplitArrays, class_ids, first_appearance_ids, read_split
from opl.data.prepare import finalize
from opl.errors import ConfigError, DatasetNotFoundError

ROLES = ("train", "base_val", "base_test", "novel_val", "novel_test")
REQUIRED = ("train", "base_test", "novel_val", "novel_test")
NOVEL = ("novel_val", "novel_test")
SOURCES = ("rfs", "cifar100")  # the RFS files, or CIFAR-FS / FC100 built from cifar-100-python/
# Which pinned split (fewshot_splits.yaml) each role's classes must equal, for the CIFAR benchmarks.
PINNED_SPLIT = {"train": "train", "novel_val": "val", "novel_test": "test"}


def _problem(problems: list[str], fn, *args):
    try:
        return fn(*args)
    except DatasetNotFoundError as exc:
        problems.append(str(exc))
        return None


def _read_cifar100(name: str, root: Path, files: dict, download: bool) -> dict[str, SplitArrays]:
    if name not in BENCHMARKS:
        raise ConfigError(f"dataset.source=cifar100 builds only {BENCHMARKS}, not {name}; use source=rfs")
    unknown = {tag for tag in files.values() if tag is not None} - set(PINNED_SPLIT.values())
    if unknown:
        raise ConfigError(f"dataset.source=cifar100 has splits {sorted(PINNED_SPLIT.values())}; "
                          f"dataset.files names {sorted(unknown)}")
    built = build_from_cifar100(name, root, download)
    return {role: built[tag] for role, tag in files.items() if tag is not None}


def _read_rfs(fmt: str, root: Path, files: dict, image_size: int, problems: list[str],
              keep_images: bool) -> dict[str, SplitArrays]:
    by_tag = {}
    for tag in dict.fromkeys(tag for tag in files.values() if tag is not None):  # each file once
        arrays = _problem(problems, read_split, fmt, root, tag, image_size)
        if arrays is not None:
            if not keep_images:  # checked already; keep only the labels
                arrays.images = arrays.images[:0]
            by_tag[tag] = arrays
    return {role: by_tag[tag] for role, tag in files.items() if tag in by_tag}


def _class_counts(raw_labels: np.ndarray) -> dict[int, int]:
    classes, counts = np.unique(raw_labels, return_counts=True)
    return dict(zip(classes.tolist(), counts.tolist()))


def check_splits(name: str, splits: dict[str, SplitArrays], files: dict, classes: dict,
                 images_per_class: dict | None, check_pinned_split: bool) -> list[str]:
    """Class counts, images per class, base/novel disjointness and (CIFAR) the pinned class lists."""
    problems = []

    def where(role):
        return f"{splits[role].label_file} ({role})"

    counts = {role: _class_counts(arrays.raw_labels) for role, arrays in splits.items()}
    for role, expected in classes.items():
        if role in counts and expected is not None and len(counts[role]) != expected:
            problems.append(f"{where(role)} key 'labels': {len(counts[role])} classes, expected {expected}")
    for role, expected in (images_per_class or {}).items():
        if role in counts and expected is not None:
            wrong = {c: n for c, n in counts[role].items() if n != expected}
            if wrong:
                shown = ", ".join(f"class {c}: {n}" for c, n in list(wrong.items())[:3])
                problems.append(f"{where(role)}: {len(wrong)} classes without {expected} images each ({shown}...)")
    for role in ("base_val", "base_test"):
        if role in counts and "train" in counts and files[role] != files["train"]:
            extra = set(counts[role]) - set(counts["train"])
            if extra:
                problems.append(f"{where(role)}: {len(extra)} classes that are not base (train) classes, "
                                f"e.g. label {min(extra)}")
    for i, a in enumerate(("train", *NOVEL)):
        for b in ("train", *NOVEL)[i + 1:]:
            if a in counts and b in counts and set(counts[a]) & set(counts[b]):
                shared = sorted(set(counts[a]) & set(counts[b]))
                problems.append(f"{where(a)} and {where(b)} share {len(shared)} class labels (e.g. {shared[0]}); "
                                f"base and novel classes must be disjoint")
    if name in BENCHMARKS and check_pinned_split:
        pinned = split_class_ids(name)
        for role, split in PINNED_SPLIT.items():
            if role in counts and sorted(counts[role]) != pinned[split]:
                missing = sorted(set(pinned[split]) - set(counts[role]))
                extra = sorted(set(counts[role]) - set(pinned[split]))
                problems.append(f"{where(role)} key 'labels': CIFAR-100 class ids differ from the published {name} "
                                f"'{split}' split (missing {missing[:5]}, unexpected {extra[:5]}); "
                                f"set dataset.check_pinned_split=false to use these files anyway")
    return problems


def read_fewshot(name: str, source: str, root, files: dict, image_size: int, classes: dict,
                 images_per_class: dict | None = None, download: bool = False,
                 check_pinned_split: bool = True, keep_images: bool = True) -> tuple[dict[str, SplitArrays], list[str]]:
    """Every role's split and the list of problems found (empty when the data are as expected).

    classes / images_per_class: expected counts by role (e.g. {"train": 64, "novel_val": 16}).
    keep_images=False drops each split's pixels once checked (checking tieredImageNet then needs
    one split in memory at a time, not all of them).
    """
    if source not in SOURCES:
        raise ConfigError(f"dataset.source={source!r}: choose from {SOURCES}")
    if name not in FORMAT_OF:
        raise ConfigError(f"unknown few-shot dataset {name!r}; choose from {sorted(FORMAT_OF)}")
    if set(files) - set(ROLES) or any(files.get(role) is None for role in REQUIRED):
        raise ConfigError(f"dataset.files must map {', '.join(REQUIRED)} (and optionally base_val) to "
                                   f"split tags; got {dict(files)}")
    root = Path(root).expanduser()
    files = {role: files.get(role) for role in ROLES}
    problems: list[str] = []
    if source == "cifar100":
        splits = _problem(problems, _read_cifar100, name, root, files, download) or {}
    else:
        if not root.is_dir():
            return {}, [f"dataset root {root} is not a folder; set dataset.root to the folder holding the "
                        f"{name} files (docs/fewshot.md says where to get them)"]
        splits = _read_rfs(FORMAT_OF[name], root, files, image_size, problems, keep_images)
        checked = set()
        for role, arrays in splits.items():  # RFS's numbering of the base classes must give 0..C-1
            if role not in NOVEL and id(arrays) not in checked:
                checked.add(id(arrays))
                _problem(problems, class_ids, FORMAT_OF[name], arrays.raw_labels, f"{arrays.label_file} ({role})")
    problems += check_splits(name, splits, files, classes, images_per_class, check_pinned_split)
    return splits, problems


def _to_tensors(name: str, source: str, role: str, arrays: SplitArrays, pinned: dict | None) -> ImageTensors:
    if source == "cifar100":  # classes numbered in CIFAR-100 id order within the split
        ids = np.searchsorted(np.asarray(pinned[PINNED_SPLIT.get(role, "train")]), arrays.raw_labels)
    elif role in NOVEL:  # episodes only need class identities; RFS keys them in order of first appearance
        ids = first_appearance_ids(arrays.raw_labels)
    else:
        ids = class_ids(FORMAT_OF[name], arrays.raw_labels, f"{arrays.label_file} ({role})")
    return ImageTensors(arrays.images, torch.from_numpy(np.ascontiguousarray(ids)))


def listing_fingerprint(sizes: dict[Path, int], root: Path, source: str | None = None) -> str:
    """16 hex digits of the sha256 of the JSON list of [path relative to `root` (else the file name),
    size in bytes] of the files read, sorted by path, inside [`source`, list] when a source is given.
    Both few-shot builders hash their files with it (`fewshot` with its source, `fewshot_folders`
    without), so the values of the data already recorded stay as they are."""
    listing = [[path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name, int(size)]
               for path, size in sorted(sizes.items())]
    return hashlib.sha256(json.dumps(listing if source is None else [source, listing]).encode()).hexdigest()[:16]


def fewshot(
    name: str,
    source: str,
    root: str,
    split: str,
    image_size: int,
    num_classes: int,
    classes: dict,
    files: dict,
    mean: list[float],
    std: list[float],
    augment: dict,
    images_per_class: dict | None = None,
    download: bool = False,
    check_pinned_split: bool = True,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataSpec:
    """A few-shot benchmark for pre-training plus its episode pools (see the module docstring).

    num_classes: the base classes; classes: the novel splits' class counts {"novel_val", "novel_test"}.
    """
    files = dict(files)
    classes = {**dict(classes), "train": num_classes}
    splits, problems = read_fewshot(name, source, root, files, image_size, classes, images_per_class, download,
                                    check_pinned_split)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetNotFoundError(f"{problems[0]}{more}; `python scripts/verify_data.py dataset={name} "
                                   f"dataset.root={root}` lists every problem")
    pinned = split_class_ids(name) if source == "cifar100" else None
    tensors = {}
    for role, arrays in splits.items():
        reused = next((r for r in tensors if splits[r] is arrays), None)  # e.g. base_test = the train file
        tensors[role] = tensors[reused] if reused else _to_tensors(name, source, role, arrays, pinned)
    origin = "rfs-files" if source == "rfs" else "built-from-cifar100"
    variant = f"{name}/{origin}/{split}" + ("" if check_pinned_split or name not in BENCHMARKS else "/split-unchecked")
    notes = {
        "source": origin,
        "files": {role: tag for role, tag in files.items() if tag is not None},
        "episode_pools": {role: {"images": len(tensors[role]), "classes": int(tensors[role].labels.unique().numel())}
                          for role in NOVEL},
    }
    spec = DataSpec(
        name=name, variant=variant, num_classes=int(num_classes), train=tensors["train"],
        test=tensors["base_test"], val=tensors.get("base_val"),
        mean=tuple(mean), std=tuple(std), augment=AugmentSpec(**(augment or {})), notes=notes,
        fingerprint=listing_fingerprint({path: path.stat().st_size for arrays in splits.values() for path in arrays.files},
                                        Path(root).expanduser(), source),
        episode_pools={"val": tensors["novel_val"], "test": tensors["novel_test"]},
    )
    return finalize(spec, 0.0, split_seed, limit_train, limit_test)
