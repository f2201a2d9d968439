"""Shared fixtures: real-format dataset folders built in temporary directories, and paths to the
real data kept beside the project (tests using it skip with a reason when it is absent)."""

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR100_PARTIAL = SHARED_DATA / "cifar100_partial.npz"
CIFAR10_JPG_TAR = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="session", autouse=True)
def index_cache_in_tmp(tmp_path_factory):
    """Folder datasets cache their file index; in tests, in a temporary folder, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPL_CACHE_DIR", str(tmp_path_factory.mktemp("opl_cache")))
        yield


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared/data beside the repo)")
    return path


def to_planes(images_nhwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> CIFAR's (N, 3072) rows of R, G, B planes."""
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1))


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    """The exact original CIFAR-100 pixels of ../shared/data/cifar100_partial.npz written out in
    torchvision's `cifar-100-python/{train,test,meta}` pickle layout."""
    arrays = np.load(require(CIFAR100_PARTIAL))
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        write_pickle(folder / split, {
            "filenames": list(arrays[f"filenames_{split}"]),
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": arrays[f"y_{split}_fine"].astype(int).tolist(),
            "coarse_labels": arrays[f"y_{split}_coarse"].astype(int).tolist(),
            "data": to_planes(arrays[f"x_{split}"]),
        })
    write_pickle(folder / "meta", {"fine_label_names": list(arrays["fine_label_names"]),
                                   "coarse_label_names": list(arrays["coarse_label_names"])})
    return root


@pytest.fixture(scope="session")
def cifar10_format_root(tmp_path_factory) -> Path:
    """A small CIFAR-10 in torchvision's `cifar-10-batches-py/` layout (random pixels: format only)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 50)]:
        write_pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                     "labels": (np.arange(n) % 10).tolist(), "batch_label": name,
                                     "filenames": [f"{name}_{i}.png" for i in range(n)]})
    return root


@pytest.fixture(scope="session")
def cifar10_jpg_root(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEG tree, extracted from ../shared/data/cifar10-jpg.tar.gz."""
    archive = require(CIFAR10_JPG_TAR)
    root = tmp_path_factory.mktemp("cifar10_jpg")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def cifar10_jpg_format_root(tmp_path_factory) -> Path:
    """A small class-folder JPEG tree in the cifar10-jpg layout (random pixels: format only)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar10_jpg_format")
    for split, per_class in (("train", 6), ("test", 2)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=75)
    return root
