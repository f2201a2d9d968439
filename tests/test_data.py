"""Dataset loading on real formats and real pixels; seeded splits; loaders."""

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from opl.data.augment import BatchAugment
from opl.data.base import AugmentSpec, DataSpec, ImageTensors
from opl.data.cifar import cifar, ensure_cifar
from opl.data.digits import bundled_digits, digits
from opl.data.fewshot_folders import fewshot_folders
from opl.data.folders import cifar10_jpg
from opl.data.loaders import DeviceDataLoader, DeviceTensorLoader, build_loader
from opl.data.splits import seeded_subset, validation_split
from opl.errors import DatasetNotFoundError

from conftest import CIFAR100_PARTIAL, REPO

CIFAR100 = dict(num_classes=100, mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762],
                augment=dict(crop_padding=4, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4))
CIFAR10 = dict(num_classes=10, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616], augment={})


def test_cifar100_loader_reads_exact_original_bytes(cifar100_root):
    """Pixels and labels come back exactly as in the original files (NHWC -> NCHW planes)."""
    arrays = np.load(CIFAR100_PARTIAL)
    spec = cifar("cifar100", str(cifar100_root), **CIFAR100)
    assert spec.variant == "cifar100/original"
    assert torch.equal(spec.train.images, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(spec.test.images, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    assert spec.train.labels.tolist() == arrays["y_train_fine"].astype(int).tolist()
    assert spec.test.labels.tolist() == arrays["y_test_fine"].astype(int).tolist()
    # The partial files are the start of the real ones: their labels match the full label lists.
    assert arrays["full_train_fine_labels"][:len(spec.train)].tolist() == spec.train.labels.tolist()
    assert set(spec.train.labels.tolist()) == set(range(100))


def test_cifar100_validation_split_is_authors_seeded_shuffle(cifar100_root):
    spec = cifar("cifar100", str(cifar100_root), val_fraction=0.1, split_seed=0, **CIFAR100)
    n = 1117
    indices = list(range(n))
    np.random.seed(0)
    np.random.shuffle(indices)  # the authors' loader
    split = int(np.floor(0.1 * n))
    full = cifar("cifar100", str(cifar100_root), **CIFAR100)
    assert torch.equal(spec.val.labels, full.train.labels[indices[:split]])
    assert torch.equal(spec.train.labels, full.train.labels[indices[split:]])
    assert len(spec.train) + len(spec.val) == n
    assert spec.variant == "cifar100/original|val=0.1@0"


def test_cifar10_pickle_layout(cifar10_format_root):
    spec = cifar("cifar10", str(cifar10_format_root), **CIFAR10)
    assert spec.train.images.shape == (200, 3, 32, 32) and spec.test.images.shape == (50, 3, 32, 32)
    raw = pickle.load(open(cifar10_format_root / "cifar-10-batches-py" / "data_batch_2", "rb"), encoding="latin1")
    assert torch.equal(spec.train.images[40:80].reshape(40, -1), torch.from_numpy(raw["data"]))


def test_missing_cifar_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_cifar("cifar100", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message and "dataset.download=true" in message


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    """With no network, download=True ends in DatasetNotFoundError naming the folder to fill."""
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        ensure_cifar("cifar10", tmp_path, download=True)


def test_corrupt_cifar_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match="not a CIFAR pickle"):
        cifar("cifar100", str(tmp_path), **CIFAR100)


def test_cifar10_jpg_real_tree_in_canonical_order(cifar10_jpg_root):
    """The real JPEG tree: 50,000 / 10,000 images, torchvision's sample order and label ids."""
    spec = cifar10_jpg(str(cifar10_jpg_root), **CIFAR10)
    assert spec.train.images.shape == (50000, 3, 32, 32) and spec.test.images.shape == (10000, 3, 32, 32)
    assert spec.variant == "cifar10/jpeg-q75"
    assert spec.fingerprint.startswith("60001:")  # 60,000 JPEGs + the canonical index file
    # Known CIFAR-10 facts: 5,000 / 1,000 images per class; the first training labels of
    # data_batch_1 are frog, truck, truck, deer, automobile (6, 9, 9, 4, 1).
    assert torch.bincount(spec.train.labels).tolist() == [5000] * 10
    assert torch.bincount(spec.test.labels).tolist() == [1000] * 10
    assert spec.train.labels[:5].tolist() == [6, 9, 9, 4, 1]
    # Per-channel means of CIFAR-10 training pixels are about (0.491, 0.482, 0.447).
    means = spec.train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01)


def test_cifar10_fewshot_cpu_data_identity_is_pinned(cifar10_jpg_root):
    """The real CIFAR-10 JPEG copy as dataset=cifar10_fewshot_cpu reads it: recorded runs carry this
    variant and fingerprint, so they must not change (values computed before the builder shared
    the file index's sizes and the listing hash)."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "dataset" / "cifar10_fewshot_cpu.yaml"))
    cfg.pop("_target_")
    spec = fewshot_folders(**{**cfg, "root": str(cifar10_jpg_root)})
    assert spec.fingerprint == "40a54be6a3ff85b8"
    assert spec.variant == ("cifar10/jpeg-q75/fewshot/base=airplane,automobile,bird,cat,deer,dog/novel=frog,horse,"
                            "ship,truck@test|base_train=500/class@0|base_test=200/class@0|novel=300/class@0")
    assert spec.train.labels.bincount().tolist() == [500] * 6 and spec.test.labels.bincount().tolist() == [200] * 6
    assert spec.episode_pools["test"].labels.bincount().tolist() == [300] * 4


def test_cifar10_jpg_missing_root_and_archive_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):
        cifar10_jpg(None, **CIFAR10)
    archive = tmp_path / "cifar10-jpg.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="extract it first"):
        cifar10_jpg(str(archive), **CIFAR10)


def test_bundled_digits_are_load_digits():
    """The file read directly is exactly what scikit-learn's load_digits() returns."""
    from sklearn.datasets import load_digits

    pixels, labels = bundled_digits()
    bunch = load_digits()
    assert pixels.shape == (1797, 8, 8) and labels.dtype == np.int64
    assert np.array_equal(pixels, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_split_and_limits():
    spec = digits(10, [0.3053], [0.3759])
    assert len(spec.train) + len(spec.test) == 1797 and len(spec.test) == 359
    assert spec.train.images.shape[1:] == (1, 8, 8) and spec.train.images.max() == 255
    limited = digits(10, [0.3053], [0.3759], limit_train=300, limit_test=100, split_seed=3)
    assert len(limited.train) == 300 and len(limited.test) == 100
    assert limited.variant == "digits/sklearn|test=0.2@0|train=300@3|test=100@3"
    again = digits(10, [0.3053], [0.3759], limit_train=300, limit_test=100, split_seed=3)
    assert torch.equal(limited.train.images, again.train.images)


def test_splits_are_seeded_and_disjoint():
    train, val = validation_split(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert (validation_split(100, 0.1, seed=1)[1] != val).any()
    subset = seeded_subset(50, 20, seed=0)
    assert len(set(subset.tolist())) == 20 and list(subset) == sorted(subset)
    with pytest.raises(ValueError):
        seeded_subset(10, 11)


def _spec(n=96, channels=3, size=32):
    g = torch.Generator().manual_seed(0)
    data = ImageTensors(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % 10)
    return DataSpec("toy", "toy", 10, data, data, None, (0.5,) * channels, (0.25,) * channels,
                    AugmentSpec(crop_padding=4, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4))


@pytest.mark.parametrize("kind", ["device", "dataloader"])
def test_loaders_batches_and_resumable_order(kind):
    spec = _spec()
    loader = build_loader(spec, spec.train, True, 32, torch.device("cpu"), kind, seed=5)
    assert isinstance(loader, DeviceTensorLoader if kind == "device" else DeviceDataLoader)
    assert len(loader) == 3
    # (seed, epoch) alone decide order and augmentation: no loader state to checkpoint, and the
    # global RNG plays no part.
    loader.set_epoch(4)
    first = [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]
    loader.set_epoch(1)
    other = list(loader)
    torch.manual_seed(12345)
    loader.set_epoch(4)
    second = list(loader)
    assert not torch.equal(torch.cat([i for _, _, i in other]), torch.cat([i for _, _, i in first]))
    for (x1, y1, i1), (x2, y2, i2) in zip(first, second):
        assert x1.shape == (32, 3, 32, 32) and x1.dtype == torch.float32
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    # Shuffled: one epoch covers each sample once, not in storage order; the index says which sample.
    labels, index = torch.cat([y for _, y, _ in first]), torch.cat([i for _, _, i in first])
    assert sorted(labels.tolist()) == sorted(spec.train.labels.tolist()) and labels.tolist() != spec.train.labels.tolist()
    assert len(set(index.tolist())) == len(index) and torch.equal(spec.train.labels[index], labels)


@pytest.mark.parametrize("kind", ["device", "dataloader"])
def test_eval_loader_is_ordered_normalised_and_complete(kind):
    spec = _spec(n=70)
    loader = build_loader(spec, spec.test, False, 32, torch.device("cpu"), kind)
    batches = list(loader)
    assert [len(y) for _, y, _ in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([i for _, _, i in batches]), torch.arange(70))
    x = torch.cat([b[0] for b in batches])
    expected = (spec.test.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["device", "dataloader"])
@pytest.mark.parametrize("n, drop_last, min_batch, sizes", [
    (97, False, 2, [32, 32, 32]),        # a last batch of one sample never reaches a pairwise loss
    (97, False, 1, [32, 32, 32, 1]),
    (98, False, 2, [32, 32, 32, 2]),     # the authors' loader keeps the last, smaller batch
    (98, True, 2, [32, 32, 32]),
])
def test_last_partial_batch(kind, n, drop_last, min_batch, sizes):
    spec = _spec(n=n)
    loader = build_loader(spec, spec.train, True, 32, torch.device("cpu"), kind, seed=1, drop_last=drop_last,
                          min_batch=min_batch)
    batches = [len(y) for _, y, _ in loader]
    assert batches == sizes and len(loader) == len(sizes)


class WorkerDraws(torch.utils.data.Dataset):
    """Items that are one draw of the worker's RNG each (as a worker-side RandomResizedCrop is)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return torch.randint(0, 256, (1, 2, 2), dtype=torch.uint8), 0


@pytest.mark.parametrize("workers", [1, 0])
def test_worker_augmentation_differs_per_rank_and_repeats_per_epoch(workers):
    augment = BatchAugment(AugmentSpec(), (0.5,), (0.25,))

    def draws(rank: int, epoch: int) -> torch.Tensor:
        loader = DeviceDataLoader(WorkerDraws(), 4, torch.device("cpu"), augment, True, num_workers=workers, seed=3,
                                  rank=rank, world=2)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _, _ in loader])

    rank0 = draws(0, 1)
    assert torch.equal(rank0, draws(0, 1))  # a resumed epoch sees the same crops
    assert not torch.equal(rank0, draws(1, 1))  # every rank its own (not the same crops on other images)
    assert not torch.equal(rank0, draws(0, 2))
