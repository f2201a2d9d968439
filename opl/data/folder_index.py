"""The file index of one split folder `<split>/<class>/<file>`, cached across starts.

Listing ImageNet's 1.28 M training files (one `stat` each, for the sizes the fingerprint needs)
takes minutes on network file systems, so the index is kept in a cache folder outside the data
(the dataset root may be read-only) and reused while the tree is unchanged. The cache key is the
split folder's real path plus the modification times of the split folder and of every class
folder: adding, removing or renaming a file or a class folder changes a folder's mtime. An image
rewritten in place under the same name does not; delete the cache file to re-list after that.

A folder modified less than `RACY_SECONDS` before its listing is not cached ("racy", as git calls
it): a change within the file system's timestamp granularity after the listing could otherwise
leave its mtime equal to the cached one.

Order: class folders sorted by name, files sorted by name within each class (as torchvision's
ImageFolder). Hidden entries (names starting with ".", e.g. macOS `._x.JPEG` copies) are skipped;
only files directly inside a class folder are listed.
"""

import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opl.errors import DatasetNotFoundError
from opl.io import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
INDEX_VERSION = 1
RACY_SECONDS = 2.0


def _pack(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one uint8 buffer plus offsets: cheap to save, load and share with workers."""
    encoded = [os.fsencode(n) for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _unpack_one(buffer: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return os.fsdecode(buffer[offsets[i]:offsets[i + 1]].tobytes())


@dataclass(frozen=True)
class SplitIndex:
    """Every image of one split folder; file i belongs to class folder `class_of(i)`."""

    path: Path  # the split folder as given
    classes: tuple[str, ...]  # class-folder names, sorted
    counts: np.ndarray  # images per class folder, aligned with `classes`
    names: np.ndarray  # uint8 buffer of "class/file" relative paths
    offsets: np.ndarray  # int64 (n + 1,): path i is names[offsets[i]:offsets[i + 1]]
    sizes: np.ndarray  # int64 (n,) file sizes in bytes
    digest: str  # sha256 of the relative paths and sizes, in index order

    def __len__(self) -> int:
        return len(self.sizes)

    def relpath(self, i: int) -> str:
        return _unpack_one(self.names, self.offsets, i)

    def file_path(self, i: int) -> Path:
        return self.path / self.relpath(i)

    def class_positions(self) -> np.ndarray:
        """Position of each file's class folder in `classes` (int64, (n,))."""
        return np.repeat(np.arange(len(self.classes), dtype=np.int64), self.counts)


def _visible_dirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)


def _tree_stamp(split_dir: Path) -> list[tuple[str, int]]:
    """(folder, mtime_ns) of the split folder and each class folder (symlinks followed)."""
    return [("", os.stat(split_dir).st_mtime_ns)] + [(e.name, e.stat().st_mtime_ns) for e in _visible_dirs(split_dir)]


def _cache_key(real_path: str, stamp: list[tuple[str, int]]) -> str:
    payload = json.dumps([INDEX_VERSION, real_path, IMAGE_EXTENSIONS, stamp])
    return hashlib.sha256(payload.encode()).hexdigest()


def _digest(relpaths: list[str], sizes: list[int]) -> str:
    h = hashlib.sha256()
    for rel, size in zip(relpaths, sizes):
        h.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\n")
    return h.hexdigest()


def _scan(split_dir: Path) -> SplitIndex:
    classes, counts, relpaths, sizes = [], [], [], []
    for class_entry in _visible_dirs(split_dir):
        with os.scandir(class_entry.path) as entries:
            files = sorted(
                (e.name, e.stat().st_size) for e in entries
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
            )
        classes.append(class_entry.name)
        counts.append(len(files))
        relpaths += [f"{class_entry.name}/{name}" for name, _ in files]
        sizes += [size for _, size in files]
    names, offsets = _pack(relpaths)
    return SplitIndex(split_dir, tuple(classes), np.asarray(counts, dtype=np.int64), names, offsets,
                      np.asarray(sizes, dtype=np.int64), _digest(relpaths, sizes))


def _save(path: Path, key: str, index: SplitIndex) -> None:
    class_names, class_offsets = _pack(list(index.classes))

    def write(f):
        buffer = io.BytesIO()
        np.savez(buffer, key=np.frombuffer(key.encode(), dtype=np.uint8), digest=np.frombuffer(index.digest.encode(), dtype=np.uint8),
                 class_names=class_names, class_offsets=class_offsets, counts=index.counts, names=index.names,
                 offsets=index.offsets, sizes=index.sizes)
        f.write(buffer.getvalue())

    atomic_write(path, write)


def _load(path: Path, key: str, split_dir: Path) -> SplitIndex | None:
    """The cached index if `path` holds one for `key`; None when absent, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if z["key"].tobytes().decode() != key:
                return None
            class_names, class_offsets = z["class_names"], z["class_offsets"]
            classes = tuple(_unpack_one(class_names, class_offsets, i) for i in range(len(class_offsets) - 1))
            return SplitIndex(split_dir, classes, z["counts"], z["names"], z["offsets"], z["sizes"],
                              z["digest"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, truncated or foreign file: list again
        return None


def default_cache_dir() -> Path:
    """$OPL_CACHE_DIR, else $XDG_CACHE_HOME/opl, else ~/.cache/opl."""
    if os.environ.get("OPL_CACHE_DIR"):
        return Path(os.environ["OPL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "opl"


def list_split(split_dir: Path, cache_dir: str | Path | None = None) -> SplitIndex:
    """The index of `split_dir`, reused from the cache when the tree is unchanged; one line says which."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"expected a class-folder tree at {split_dir}/<class>/<image>")
    real_path = os.path.realpath(split_dir)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = cache_root / "folder-index" / f"{hashlib.sha256(real_path.encode()).hexdigest()[:24]}.npz"
    started = time.time_ns()
    try:
        stamp = _tree_stamp(split_dir)
        key = _cache_key(real_path, stamp)
        cached = _load(cache_file, key, split_dir)
        if cached is not None:
            print(f"file index: reused {cache_file} for {split_dir} ({len(cached)} images, "
                  f"{len(cached.classes)} class folders)", flush=True)
            return cached
        index = _scan(split_dir)
    except OSError as exc:  # e.g. a class folder without read permission
        raise DatasetNotFoundError(f"cannot list {exc.filename or split_dir}: {exc.strerror or exc}") from None
    listed = f"file index: listed {len(index)} images in {len(index.classes)} class folders of {split_dir} " \
             f"in {(time.time_ns() - started) / 1e9:.1f} s"
    if max(mtime for _, mtime in stamp) >= started - int(RACY_SECONDS * 1e9):
        print(f"{listed}; not cached (the tree changed less than {RACY_SECONDS:g} s ago)", flush=True)
        return index
    try:
        _save(cache_file, key, index)
    except OSError as exc:
        print(f"{listed}; not cached ({cache_file}: {exc.strerror or exc}; set OPL_CACHE_DIR to a writable "
              "folder)", flush=True)
        return index
    print(f"{listed}; cached at {cache_file}", flush=True)
    return index
