"""Class-folder datasets (imagenet, imagefolder, cifar10_jpg) on real JPEGs from ../shared/data:
one class list for every split, the cached file index, the fingerprint, unreadable images, and the
reference transforms."""

import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as F

from conftest import CIFAR10_JPG_TAR, REPO, SHARED_DATA, require
from scripts import bench_data
from opl.data.augment import BatchAugment
from opl.data.base import AugmentSpec
from opl.data.folder_index import list_split
from opl.data.folders import FolderImages, cifar10_jpg, eval_resize, image_folder
from opl.errors import ConfigError, DatasetNotFoundError
from train import instantiate_checked as instantiate

PACS_PHOTO = SHARED_DATA / "pacs" / "PACS" / "photo"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10 = dict(num_classes=10, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616], augment={"hflip": True},
               index_file=None)
PER_CLASS = 12  # real CIFAR-10 test JPEGs kept per class (0000.jpg ... 0011.jpg)


def folder_kw(**kw):
    return dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, augment={"hflip": True}) | kw


@pytest.fixture(scope="module")
def cifar_pool(tmp_path_factory) -> Path:
    """The first PER_CLASS real JPEGs of every class of the CIFAR-10 test split: <pool>/<class>/NNNN.jpg."""
    wanted = re.compile(r"(\./)?test/(\w+)/00(\d\d)\.jpg$")
    pool = tmp_path_factory.mktemp("cifar_pool")
    with tarfile.open(require(CIFAR10_JPG_TAR)) as tar:
        members = [m for m in tar if (hit := wanted.match(m.name)) and int(hit.group(3)) < PER_CLASS]
        tar.extractall(pool, members=members, filter="data")
    assert len(members) == 10 * PER_CLASS
    return pool / "test"


def age(split_dir: Path, seconds: float = 60) -> None:
    """Date the split folder and its class folders back, as for any tree not modified just now
    (the index of a tree modified in the last 2 s is not cached)."""
    past = time.time() - seconds
    for folder in [split_dir, *[p for p in split_dir.iterdir() if p.is_dir()]]:
        os.utime(folder, (past, past))


def make_tree(root: Path, pool: Path, splits: dict[str, dict[str, range]]) -> Path:
    """Copies of pool images into <root>/<split>/<class>/NNNN.jpg, aged."""
    for split, classes in splits.items():
        for name, numbers in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in numbers:
                shutil.copyfile(pool / name / f"{i:04d}.jpg", root / split / name / f"{i:04d}.jpg")
        age(root / split)
    return root


def full(classes=CIFAR_CLASSES, numbers=range(4)) -> dict[str, range]:
    return {c: numbers for c in classes}


# ------------------------------------------------------------------------------------ one class list
def test_class_folder_missing_from_the_test_split_is_an_error(tmp_path, cifar_pool):
    """The failure of issue 9: without the index file, a test split lacking a class folder used to be
    renumbered silently (every class after the gap shifted by one); now it names the folder."""
    without_cat = [c for c in CIFAR_CLASSES if c != "cat"]
    root = make_tree(tmp_path, cifar_pool, {"train": full(), "test": full(without_cat, range(4, 6))})
    with pytest.raises(DatasetNotFoundError) as err:
        cifar10_jpg(str(root), **CIFAR10)
    message = str(err.value)
    assert "missing cat" in message and str(root / "test") in message and "\n" not in message
    with pytest.raises(DatasetNotFoundError, match="missing cat"):
        image_folder(str(root), 10, image_size=32, test_split="test", **folder_kw())


def test_extra_or_empty_class_folder_is_an_error(tmp_path, cifar_pool):
    root = make_tree(tmp_path, cifar_pool, {"train": full(), "test": full(numbers=range(4, 6))})
    (root / "test" / "unicorn").mkdir()
    shutil.copyfile(cifar_pool / "cat" / "0006.jpg", root / "test" / "unicorn" / "0006.jpg")
    with pytest.raises(DatasetNotFoundError, match=r"test: class folders do not match .*extra unicorn"):
        image_folder(str(root), 10, image_size=32, test_split="test", **folder_kw())
    shutil.rmtree(root / "test" / "unicorn")
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError, match="without images dog"):
        image_folder(str(root), 10, image_size=32, test_split="test", **folder_kw())
    shutil.copyfile(cifar_pool / "dog" / "0004.jpg", root / "test" / "dog" / "0004.jpg")
    with pytest.raises(DatasetNotFoundError, match="has 10 class folders .* dataset.num_classes is 7"):
        image_folder(str(root), 7, image_size=32, test_split="test", **folder_kw())


def test_every_split_takes_its_ids_from_the_training_class_list(tmp_path, cifar_pool):
    root = make_tree(tmp_path, cifar_pool, {"train": full(), "test": full(numbers=range(4, 7))})
    spec = cifar10_jpg(str(root), **CIFAR10)
    assert spec.variant == "cifar10/jpeg-q75" and spec.fingerprint.startswith("70:")
    assert spec.train.images.shape == (40, 3, 32, 32) and spec.test.images.shape == (30, 3, 32, 32)
    streamed = image_folder(str(root), 10, image_size=32, test_split="test", **folder_kw())
    for split, n in (("train", 4), ("test", 3)):
        files = sorted((root / split).glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name))
        expected = torch.tensor([CIFAR_CLASSES.index(p.parent.name) for p in files])  # airplane=0 ... truck=9
        assert torch.equal(getattr(spec, split).labels, expected)
        assert torch.equal(torch.bincount(expected), torch.full((10,), n))
        dataset = getattr(streamed, split)
        assert [dataset.index.file_path(i) for i in range(len(dataset))] == files
        assert torch.equal(torch.from_numpy(dataset.labels), expected)
        # In memory: the decoded JPEG itself.
        assert torch.equal(getattr(spec, split).images[5], torch.from_numpy(np.array(Image.open(files[5]))).permute(2, 0, 1))


# ------------------------------------------------------------------------------------ ImageNet
def compose_dataset(name: str, *overrides):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"dataset={name}", *overrides]).dataset


def test_missing_imagenet_names_the_path_the_layout_and_the_val_preparation(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):
        instantiate(compose_dataset("imagenet"))
    root = tmp_path / "ILSVRC2012"
    with pytest.raises(DatasetNotFoundError) as err:
        instantiate(compose_dataset("imagenet", f"dataset.root={root}"))
    message = str(err.value)
    for part in (f"no imagenet at {root}", "<root>/train/<class>/<image>", "<root>/val/<class>/<image>",
                 "1000 class folders", "sorted into <wnid> class folders", "valprep.sh"):
        assert part in message, part
    assert "\n" not in message
    (root / "train").mkdir(parents=True)  # train present, val not yet prepared
    with pytest.raises(DatasetNotFoundError, match=f"{root / 'val'} is not a folder"):
        instantiate(compose_dataset("imagenet", f"dataset.root={root}"))


def test_imagenet_config_on_a_tree_of_the_1000_synset_folders(tmp_path, cifar_pool):
    """dataset=imagenet end to end on 1,000 wnid folders of one real JPEG each (symlinks)."""
    synsets = (Path(__import__("timm").__file__).parent / "data/_info/imagenet_synsets.txt").read_text().split()
    assert len(synsets) == 1000
    picture = cifar_pool / "ship" / "0003.jpg"
    for split in ("train", "val"):
        for wnid in synsets:
            (tmp_path / split / wnid).mkdir(parents=True)
            (tmp_path / split / wnid / f"{wnid}_1.JPEG").symlink_to(picture)
        age(tmp_path / split)
    spec = instantiate(compose_dataset("imagenet", f"dataset.root={tmp_path}"))
    assert spec.name == "imagenet" and spec.num_classes == 1000 and len(spec.train) == len(spec.test) == 1000
    assert spec.variant == "imagenet/folder|size=224|resize=256" and spec.fingerprint.startswith("2000:")
    assert spec.augment == AugmentSpec(hflip=True) and spec.mean == (0.485, 0.456, 0.406)
    assert spec.train.labels.tolist() == list(range(1000))  # sorted wnids: n01440764 (tench) = 0
    assert spec.test.index.relpath(0) == "n01440764/n01440764_1.JPEG"
    x, y = spec.test[999]
    assert x.dtype == torch.uint8 and x.shape == (3, 224, 224) and y == 999
    shutil.rmtree(tmp_path / "val" / synsets[17])
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'val'}: class folders .* missing {synsets[17]}"):
        instantiate(compose_dataset("imagenet", f"dataset.root={tmp_path}"))


def test_imagefolder_config_and_its_checks(tmp_path, cifar_pool):
    root = make_tree(tmp_path / "tiny", cifar_pool, {"train": full(), "val": full(numbers=range(4, 6))})
    cfg = compose_dataset("imagefolder", f"dataset.root={root}", "dataset.num_classes=10", "dataset.image_size=24")
    spec = instantiate(cfg)
    assert spec.variant == "imagefolder/tiny|size=24|resize=27" and spec.fingerprint.startswith("60:")
    assert spec.train[0][0].shape == spec.test[0][0].shape == (3, 24, 24)
    for bad, error in (("dataset.image_size=0", ConfigError), ("dataset.eval_crop_ratio=1.5", ConfigError),
                       ("dataset.test_split=train", ConfigError), ("dataset.classes=no-such-list", ConfigError),
                       ("dataset.classes=imagenet-1k", ConfigError)):  # 1,000 names, num_classes 10
        with pytest.raises(error):
            instantiate(compose_dataset("imagefolder", f"dataset.root={root}", "dataset.num_classes=10", bad))


# ------------------------------------------------------------------------------------ the index cache
def listing(split_dir: Path, capsys) -> tuple:
    """The index and what its one message says: "listed" or "reused"."""
    index = list_split(split_dir)
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("file index: ")
    return index, out.split()[2]


def test_index_cache_is_reused_and_invalidated_by_every_tree_change(tmp_path, cifar_pool, capsys):
    split = make_tree(tmp_path, cifar_pool, {"train": full(numbers=range(3))}) / "train"
    first, how = listing(split, capsys)
    assert how == "listed" and len(first) == 30
    again, how = listing(split, capsys)
    assert how == "reused" and again.digest == first.digest and len(again) == 30

    def changed(expect_len, expect_classes):
        age(split, 30)
        index, how = listing(split, capsys)
        assert how == "listed" and len(index) == expect_len and len(index.classes) == expect_classes
        assert listing(split, capsys)[1] == "reused"
        return index

    shutil.copyfile(cifar_pool / "dog" / "0007.jpg", split / "dog" / "0007.jpg")  # add a file
    assert changed(31, 10).relpath(5 * 3 + 3) == "dog/0007.jpg"
    (split / "bird" / "0000.jpg").unlink()  # remove a file
    assert "bird/0000.jpg" not in [changed(30, 10).relpath(i) for i in range(30)]
    (split / "zebra").mkdir()  # add a class folder
    shutil.copyfile(cifar_pool / "cat" / "0000.jpg", split / "zebra" / "0000.jpg")
    assert changed(31, 11).classes[-1] == "zebra"
    (split / "zebra" / "0000.jpg").rename(split / "zebra" / "0001.jpg")  # rename a file
    assert changed(31, 11).relpath(30) == "zebra/0001.jpg"
    (split / "zebra").rename(split / "okapi")  # rename a class folder
    assert "okapi" in changed(31, 11).classes


def test_index_not_cached_for_a_tree_changed_just_now_or_an_unwritable_cache(tmp_path, cifar_pool, capsys):
    split = make_tree(tmp_path, cifar_pool, {"train": full(numbers=range(2))}) / "train"
    shutil.copyfile(cifar_pool / "dog" / "0005.jpg", split / "dog" / "0005.jpg")  # mtime: now
    index = list_split(split)
    assert "not cached (the tree changed less than 2 s ago)" in capsys.readouterr().out and len(index) == 21
    age(split)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    index = list_split(split, cache_dir=blocker / "cache")  # a cache folder that cannot exist
    out = capsys.readouterr().out
    assert f"not cached ({blocker / 'cache' / 'folder-index'}" in out and "OPL_CACHE_DIR" in out and len(index) == 21
    list_split(split, cache_dir=tmp_path / "cache")
    cached = next((tmp_path / "cache" / "folder-index").iterdir())
    cached.write_bytes(cached.read_bytes()[:100])  # a truncated cache file: listed again, rewritten
    assert len(list_split(split, cache_dir=tmp_path / "cache")) == 21
    assert "listed 21 images" in capsys.readouterr().out.splitlines()[-1]
    assert len(list_split(split, cache_dir=tmp_path / "cache")) == 21
    assert "reused" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_follows_the_files_read_not_the_path(tmp_path, cifar_pool):
    layout = {"train": full(numbers=range(3)), "val": full(numbers=range(3, 5))}
    root = make_tree(tmp_path / "a", cifar_pool, layout)

    def fp(r=root, **kw):
        return image_folder(str(r), 10, image_size=32, **folder_kw(**kw)).fingerprint

    reference = fp()
    assert re.fullmatch(r"50:[0-9a-f]{16}", reference)
    assert fp() == reference  # from the cache
    assert fp(index_cache=str(tmp_path / "fresh")) == reference  # listed afresh
    assert fp(make_tree(tmp_path / "b", cifar_pool, layout)) == reference  # same files elsewhere
    assert fp(limit_train=5) == reference  # subsets are in the variant; the fingerprint is of the tree

    target = root / "train" / "cat" / "0001.jpg"
    replacement = tmp_path / "new.jpg"
    Image.open(target).rotate(90).save(replacement, quality=95)  # other content, other size
    assert replacement.stat().st_size != target.stat().st_size
    os.replace(replacement, target)  # how tools replace files (write, then rename over)
    age(root / "train")
    changed = fp()
    assert changed != reference
    target.rename(target.with_name("0099.jpg"))
    age(root / "train")
    assert fp() not in (reference, changed)


def test_fingerprint_of_the_real_cifar10_jpg_tree_counts_images_and_index_file(tmp_path, cifar_pool):
    root = make_tree(tmp_path, cifar_pool, {"train": full(numbers=range(2)), "test": full(numbers=range(2, 3))})
    (root / "cifar10_canonical_index.csv").write_text(
        "split,batch,index_in_batch,label,jpg_path\n"
        + "".join(f"{s},b,{k},{c},{s}/{CIFAR_CLASSES[c]}/{i:04d}.jpg\n"
                  for s, numbers in (("train", range(2)), ("test", range(2, 3)))
                  for k, (i, c) in enumerate((i, c) for c in reversed(range(10)) for i in numbers)))
    kw = CIFAR10 | {"index_file": "cifar10_canonical_index.csv"}
    spec = cifar10_jpg(str(root), **kw)
    assert spec.fingerprint.startswith("31:")  # 30 images + the index file
    assert spec.train.labels.tolist() == [c for c in reversed(range(10)) for _ in range(2)]
    without = cifar10_jpg(str(root), **CIFAR10)
    assert without.fingerprint.startswith("30:") and without.train.labels.tolist() == sorted(spec.train.labels.tolist())


# ------------------------------------------------------------------------------------ unreadable images
def test_truncated_or_foreign_image_is_an_error_naming_the_file(tmp_path, cifar_pool):
    root = make_tree(tmp_path, cifar_pool, {"train": full(numbers=range(2)), "test": full(numbers=range(2, 3))})
    broken = root / "test" / "frog" / "0002.jpg"
    broken.write_bytes(broken.read_bytes()[:300])  # truncated mid-scan
    age(root / "test")
    spec = image_folder(str(root), 10, image_size=32, test_split="test", **folder_kw())
    position = [spec.test.index.file_path(i) for i in range(len(spec.test))].index(broken)
    with pytest.raises(DatasetNotFoundError, match=f"cannot read image {re.escape(str(broken))}: (?i:.*truncated)"):
        spec.test[position]
    with pytest.raises(DatasetNotFoundError, match=f"cannot read image {re.escape(str(broken))}"):
        cifar10_jpg(str(root), **CIFAR10)
    # From a DataLoader worker the same error type arrives, its message (with the worker's
    # traceback, as PyTorch re-raises it) still naming the file.
    with pytest.raises(DatasetNotFoundError, match=f"cannot read image {re.escape(str(broken))}"):
        list(DataLoader(spec.test, batch_size=5, num_workers=1))
    broken.write_text("not an image")
    with pytest.raises(DatasetNotFoundError, match=f"cannot read image {re.escape(str(broken))}: cannot identify"):
        spec.test[position]


# ------------------------------------------------------------------------------------ transforms
@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory) -> Path:
    """A PACS domain (photo: 1,670 real 227x227 JPEGs, 7 classes) as train and val class-folder splits."""
    root = tmp_path_factory.mktemp("pacs_photo")
    for split in ("train", "val"):
        (root / split).symlink_to(require(PACS_PHOTO), target_is_directory=True)
    return root


def test_pacs_domain_as_class_folders(pacs_root):
    spec = image_folder(str(pacs_root), 7, image_size=64, limit_train=100, limit_test=50, split_seed=3, **folder_kw())
    full_train = spec.train.dataset
    counts = {c: len(os.listdir(PACS_PHOTO / c)) for c in sorted(os.listdir(PACS_PHOTO))}
    assert list(counts) == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert len(full_train) == sum(counts.values()) == 1670  # the documented size of PACS photo
    assert np.bincount(full_train.labels).tolist() == list(counts.values())
    assert len(spec.train) == 100 and len(spec.test) == 50
    assert spec.variant == "imagefolder/pacs_photo0|size=64|resize=73|train=100@3|test=50@3"
    assert spec.fingerprint.startswith("3340:")
    x, y = spec.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and 0 <= y < 7


def test_transforms_are_the_reference_recipe_and_seeded(pacs_root):
    spec = image_folder(str(pacs_root), 7, image_size=112, **folder_kw())
    path = spec.train.index.file_path(10)
    image = Image.open(path).convert("RGB")
    # Evaluation: Resize(round(112 * 256 / 224) = 128) + CenterCrop(112), bilinear (presets.py).
    assert eval_resize(224, 0.875) == 256 and eval_resize(112, 0.875) == 128
    expected = F.pil_to_tensor(F.center_crop(F.resize(image, 128, T.InterpolationMode.BILINEAR), 112))
    assert torch.equal(spec.test[10][0], expected)
    # Training: RandomResizedCrop(112, scale (0.08, 1), ratio (3/4, 4/3)), drawn from the torch RNG.
    torch.manual_seed(5)
    top, left, h, w = T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
    reference = F.pil_to_tensor(F.resized_crop(image, top, left, h, w, [112, 112], T.InterpolationMode.BILINEAR))
    torch.manual_seed(5)
    x, y = spec.train[10]
    assert x.dtype == torch.uint8 and x.shape == (3, 112, 112) and y == int(spec.train.labels[10])
    assert torch.equal(x, reference)
    torch.manual_seed(5)
    assert torch.equal(spec.train[10][0], x)
    torch.manual_seed(6)
    assert not torch.equal(spec.train[10][0], x)


def test_workers_decode_uint8_batches_that_batch_augment_finishes(pacs_root):
    spec = image_folder(str(pacs_root), 7, image_size=48, limit_train=32, **folder_kw())

    def batches(seed):
        loader = DataLoader(spec.train, batch_size=8, shuffle=True, num_workers=2,
                            generator=torch.Generator().manual_seed(seed))
        return [(x, y) for x, y in loader]

    first = batches(0)
    assert len(first) == 4 and first[0][0].dtype == torch.uint8 and first[0][0].shape == (8, 3, 48, 48)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches(0)))
    augment = BatchAugment(spec.augment, spec.mean, spec.std)
    x = first[0][0]
    normalised = augment(x, train=False)
    manual = (x.double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised.double(), manual, atol=1e-5, rtol=0)
    flipped = augment(x, train=True, generator=torch.Generator().manual_seed(0))
    for i in range(8):  # every sample either flipped or not, nothing else
        assert torch.allclose(flipped[i], normalised[i], atol=1e-6) or torch.allclose(flipped[i], normalised[i].flip(-1), atol=1e-6)


def test_held_out_part_of_train_is_evaluated_with_the_eval_transform(pacs_root):
    spec = image_folder(str(pacs_root), 7, image_size=48, val_fraction=0.1, **folder_kw())
    assert len(spec.val) == 167 and len(spec.train) == 1670 - 167 and spec.variant.endswith("|val=0.1@0")
    torch.manual_seed(0)
    a = spec.val[3][0]
    torch.manual_seed(1)
    assert torch.equal(spec.val[3][0], a)  # centre crop: no randomness
    assert isinstance(spec.val.dataset, FolderImages) and not set(spec.val.indices) & set(spec.train.indices)


def test_bench_data_reports_images_per_second_per_worker(pacs_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_data.main(["--root", str(pacs_root), "--split", "val", "--image-size", "64", "--images", "20",
                              "--warmup", "2", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == result
    assert result["data"]["files"] == 1670 and result["data"]["mean_source_size"] == [227.0, 227.0]
    for mode in ("train", "eval"):
        timing = result["modes"][mode]
        assert timing["images"] == 20 and timing["workers"] == 0 and timing["seconds"] > 0
        assert timing["per_worker_images_per_s"] == timing["images_per_s"] == 20 / timing["seconds"]
