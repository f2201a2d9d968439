"""Few-shot data: RFS's file layouts written exactly in tmp, CIFAR-FS / FC100 built from the real
partial CIFAR-100 files, the pinned class splits, and scripts/verify_data.py."""

import hashlib
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from opl.data.fewshot import fewshot, listing_fingerprint, read_fewshot
from opl.data.fewshot_cifar100 import SPLITS_FILE, split_class_ids, split_class_names
from opl.data.fewshot_formats import first_appearance_ids
from opl.errors import ConfigError, DatasetNotFoundError

from conftest import CIFAR100_PARTIAL, REPO, require, write_pickle

sys.path.insert(0, str(REPO / "scripts"))
import verify_data  # noqa: E402

MINI_FILES = {"train": "train_phase_train", "base_val": "train_phase_val", "base_test": "train_phase_test",
              "novel_val": "val", "novel_test": "test"}


def config(name, **overrides):
    """configs/dataset/<name>.yaml as the builder's keyword arguments, with overrides."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "dataset" / f"{name}.yaml"))
    cfg.pop("_target_")
    cfg.update(overrides)
    return cfg


def images(rng, n, size):
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_mini(root, rng, per_class=3):
    """RFS's miniImageNet pickles: base classes 0..3 (three phases), novel val 4..5, test 6..8."""
    layout = {"train_phase_train": range(0, 4), "train_phase_val": range(0, 4), "train_phase_test": range(0, 4),
              "val": range(4, 6), "test": range(6, 9)}
    written = {}
    for tag, classes in layout.items():
        labels = [c for c in classes for _ in range(per_class)]
        data = images(rng, len(labels), 84)
        write_pickle(root / f"miniImageNet_category_split_{tag}.pickle", {"data": data, "labels": labels})
        written[tag] = (data, np.array(labels))
    return written


def mini_config(root, **overrides):
    small = dict(root=str(root), num_classes=4, classes={"novel_val": 2, "novel_test": 3},
                 images_per_class={"novel_val": 3, "novel_test": 3})
    return config("mini_imagenet", **{**small, **overrides})


def test_mini_imagenet_reader_reads_rfs_pickles_exactly(tmp_path):
    written = write_mini(tmp_path, np.random.default_rng(0))
    spec = fewshot(**mini_config(tmp_path))
    nchw = {tag: torch.from_numpy(data).permute(0, 3, 1, 2) for tag, (data, _) in written.items()}
    assert torch.equal(spec.train.images, nchw["train_phase_train"])
    assert torch.equal(spec.val.images, nchw["train_phase_val"])
    assert torch.equal(spec.test.images, nchw["train_phase_test"])
    assert torch.equal(spec.episode_pools["val"].images, nchw["val"])
    assert torch.equal(spec.episode_pools["test"].images, nchw["test"])
    # RFS: target = label - min(labels) (dataset/mini_imagenet.py:79)
    assert spec.train.labels.tolist() == written["train_phase_train"][1].tolist()
    assert spec.episode_pools["test"].labels.tolist() == (written["test"][1] - 6).tolist()
    assert spec.num_classes == 4 and spec.variant == "mini_imagenet/rfs-files/ravi-64-16-20"
    assert spec.mean == pytest.approx([x / 255 for x in (120.39586422, 115.59361427, 104.54012653)], abs=1e-8)
    assert spec.std == pytest.approx([x / 255 for x in (70.68188272, 68.27635443, 72.54505529)], abs=1e-8)
    assert (spec.augment.crop_padding, spec.augment.hflip, spec.augment.brightness) == (8, True, 0.4)
    json.dumps(spec.notes)  # kept with the results
    assert spec.notes["episode_pools"] == {"novel_val": {"images": 6, "classes": 2},
                                           "novel_test": {"images": 9, "classes": 3}}


def test_fingerprint_follows_the_files_read(tmp_path):
    write_mini(tmp_path, np.random.default_rng(0))
    first = fewshot(**mini_config(tmp_path)).fingerprint
    assert first == fewshot(**mini_config(tmp_path)).fingerprint and len(first) == 16
    listing = [[path.name, path.stat().st_size] for path in sorted(tmp_path.glob("*.pickle"))]  # the 5 files read
    assert len(listing) == 5 and first == hashlib.sha256(json.dumps(["rfs", listing]).encode()).hexdigest()[:16]
    write_mini(tmp_path, np.random.default_rng(1), per_class=4)  # other files, same names
    changed = fewshot(**mini_config(tmp_path, images_per_class={})).fingerprint
    assert changed != first


def test_fingerprint_values_are_pinned(tmp_path):
    """Recorded runs carry these fingerprints: the values of the few-shot builders' listing hash must
    not change. Pinned on files of fixed sizes (computed before the hash became one shared helper);
    full paths sort by their parts ("sub/b.npz" before "sub-x.pkl"), a file outside root counts by name."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    sizes = {root / "sub-x.pkl": 5, root / "sub" / "b.npz": 10, root / "a.pickle": 3}
    for path, size in sizes.items():
        path.write_bytes(b"x" * size)
    outside = tmp_path / "elsewhere.npz"
    outside.write_bytes(bytes(7))
    assert listing_fingerprint(sizes, root) == "eacf2173580ed698"  # fewshot_folders (no source)
    assert listing_fingerprint({**sizes, outside: 7}, root, "rfs") == "6d67934124588cf8"  # fewshot
    listing = [["a.pickle", 3], ["sub/b.npz", 10], ["sub-x.pkl", 5]]  # the hashed text, explicitly
    assert listing_fingerprint(sizes, root) == hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    with_outside = [["elsewhere.npz", 7], ["a.pickle", 3], ["sub/b.npz", 10], ["sub-x.pkl", 5]]  # by full path
    assert listing_fingerprint({**sizes, outside: 7}, root, "rfs") == hashlib.sha256(
        json.dumps(["rfs", with_outside]).encode()).hexdigest()[:16]


def test_rfs_label_numbering_rules():
    # CIFAR-FS / FC100 pickles: classes numbered in order of first appearance (rfs dataset/cifar.py:56-66)
    raw = np.array([57, 3, 57, 99, 3, 12, 99])
    reference, mapping = [], {}
    for label in raw.tolist():
        mapping.setdefault(label, len(mapping))
        reference.append(mapping[label])
    assert first_appearance_ids(raw).tolist() == reference == [0, 1, 0, 2, 1, 3, 2]


def test_tiered_imagenet_reader(tmp_path):
    rng = np.random.default_rng(0)
    layout = {"train": range(10, 14), "val": range(14, 16), "test": range(16, 19)}
    written = {}
    for tag, classes in layout.items():
        labels = [c for c in classes for _ in range(2)]
        data = images(rng, len(labels), 84)
        np.savez(tmp_path / f"{tag}_images.npz", images=data)
        # the released label pickles carry more keys; RFS reads `labels` (tiered_imagenet.py:56)
        write_pickle(tmp_path / f"{tag}_labels.pkl", {"labels": labels, "label_specific": labels,
                                                       "label_general": [0] * len(labels)})
        written[tag] = (data, np.array(labels))
    spec = fewshot(**config("tiered_imagenet", root=str(tmp_path), num_classes=4,
                            classes={"novel_val": 2, "novel_test": 3}))
    assert torch.equal(spec.train.images, torch.from_numpy(written["train"][0]).permute(0, 3, 1, 2))
    assert spec.train.labels.tolist() == (written["train"][1] - 10).tolist()
    assert spec.test is spec.train and spec.val is None  # no held-out base images in the release
    assert spec.episode_pools["val"].labels.tolist() == [0, 0, 1, 1]
    assert spec.variant == "tiered_imagenet/rfs-files/ren-351-97-160"


def write_cifar_pickles(root, rng, benchmark, per_class=2, swap=None):
    """RFS's CIFAR-FS / FC100 pickles: labels are CIFAR-100 fine ids, classes interleaved."""
    for split, ids in split_class_ids(benchmark).items():
        ids = list(ids)
        if swap is not None and split == "test":
            ids[0] = swap
        labels = [c for _ in range(per_class) for c in reversed(ids)]
        write_pickle(root / f"{split}.pickle", {"data": images(rng, len(labels), 32), "labels": labels})


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"])
def test_cifar_pickles_checked_against_the_published_split(tmp_path, name):
    write_cifar_pickles(tmp_path, np.random.default_rng(0), name)
    spec = fewshot(**config(name, root=str(tmp_path), images_per_class=None))
    train_ids = split_class_ids(name)["train"]
    with open(tmp_path / "train.pickle", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["labels"]
    assert spec.train.labels.tolist() == first_appearance_ids(np.array(raw)).tolist()
    assert spec.num_classes == len(train_ids) == {"cifar_fs": 64, "fc100": 60}[name]
    assert spec.mean == (0.5071, 0.4867, 0.4408) and spec.std == (0.2675, 0.2565, 0.2761)
    assert spec.augment.crop_padding == 4


def test_cifar_pickles_with_another_split_are_refused(tmp_path):
    moved = split_class_ids("cifar_fs")["train"][0]  # a base class written into the test split
    write_cifar_pickles(tmp_path, np.random.default_rng(0), "cifar_fs", swap=moved)
    cfg = config("cifar_fs", root=str(tmp_path), images_per_class=None)
    _, problems = read_fewshot(cfg["name"], cfg["source"], cfg["root"], cfg["files"], 32,
                               {**cfg["classes"], "train": 64})
    removed = split_class_ids("cifar_fs")["test"][0]
    assert problems == [
        f"{tmp_path / 'train.pickle'} (train) and {tmp_path / 'test.pickle'} (novel_test) share 1 class labels "
        f"(e.g. {moved}); base and novel classes must be disjoint",
        f"{tmp_path / 'test.pickle'} (novel_test) key 'labels': CIFAR-100 class ids differ from the published "
        f"cifar_fs 'test' split (missing [{removed}], unexpected [{moved}]); set dataset.check_pinned_split=false "
        f"to use these files anyway",
    ]
    with pytest.raises(DatasetNotFoundError, match=r"must be disjoint \(and 1 more problems\); `python "
                                                   r"scripts/verify_data.py dataset=cifar_fs"):
        fewshot(**cfg)


def test_pinned_splits_cover_cifar100_once():
    fs, fc = split_class_names("cifar_fs"), split_class_names("fc100")
    assert {k: len(v) for k, v in fs.items()} == {"train": 64, "val": 16, "test": 20}
    assert {k: len(v) for k, v in fc.items()} == {"train": 60, "val": 20, "test": 20}
    pinned = yaml.safe_load(SPLITS_FILE.read_text())
    assert {k: len(v) for k, v in pinned["fc100"]["superclasses"].items()} == {"train": 12, "val": 4, "test": 4}
    for splits in (fs, fc):
        every = [name for names in splits.values() for name in names]
        assert len(every) == len(set(every)) == 100  # disjoint, each class once
        assert set(every) == set(pinned["cifar100"]["fine_label_names"])
    # TADAM's superclass ids (Oreshkin et al. 2018, supplementary)
    coarse = list(pinned["cifar100"]["superclasses"])
    assert [coarse.index(s) for s in pinned["fc100"]["superclasses"]["val"]] == [8, 11, 13, 16]
    assert [coarse.index(s) for s in pinned["fc100"]["superclasses"]["test"]] == [0, 7, 12, 14]


def test_pinned_cifar100_names_and_hierarchy_match_the_real_files():
    arrays = np.load(require(CIFAR100_PARTIAL))
    pinned = yaml.safe_load(SPLITS_FILE.read_text())["cifar100"]
    assert pinned["fine_label_names"] == [str(n) for n in arrays["fine_label_names"]]
    assert list(pinned["superclasses"]) == [str(n) for n in arrays["coarse_label_names"]]
    fine = pinned["fine_label_names"]
    for split in ("train", "test"):
        pairs = set(zip(arrays[f"full_{split}_fine_labels"].tolist(), arrays[f"full_{split}_coarse_labels"].tolist()))
        assert pairs == {(fine.index(name), c) for c, names in enumerate(pinned["superclasses"].values())
                         for name in names}


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"])
def test_built_from_real_cifar100_files(cifar100_root, name):
    arrays = np.load(CIFAR100_PARTIAL)
    spec = fewshot(**config(name, source="cifar100", root=str(cifar100_root), images_per_class=None))
    originals = np.concatenate([arrays["x_train"], arrays["x_test"]])
    fine = np.concatenate([arrays["y_train_fine"], arrays["y_test_fine"]])
    coarse = np.concatenate([arrays["y_train_coarse"], arrays["y_test_coarse"]])
    ids = split_class_ids(name)
    pools = {"train": spec.train, "val": spec.episode_pools["val"], "test": spec.episode_pools["test"]}
    assert sum(len(p) for p in pools.values()) == len(originals)  # every image in exactly one split
    for split, pool in pools.items():
        index = np.flatnonzero(np.isin(fine, ids[split]))  # train file then test file, file order
        assert torch.equal(pool.images, torch.from_numpy(originals[index]).permute(0, 3, 1, 2))
        assert pool.labels.tolist() == np.searchsorted(ids[split], fine[index]).tolist()
        assert len(set(pool.labels.tolist())) == len(ids[split])
        if name == "fc100":  # the real coarse labels: whole superclasses per split
            supers = yaml.safe_load(SPLITS_FILE.read_text())["fc100"]["superclasses"][split]
            names = [str(n) for n in arrays["coarse_label_names"]]
            assert set(coarse[index].tolist()) == {names.index(s) for s in supers}
    assert spec.test is spec.train and spec.val is None
    assert spec.variant == {"cifar_fs": "cifar_fs/built-from-cifar100/bertinetto-64-16-20",
                            "fc100": "fc100/built-from-cifar100/oreshkin-superclass-60-20-20"}[name]


def test_every_missing_or_malformed_file_names_file_and_key(tmp_path):
    rng = np.random.default_rng(0)
    write_mini(tmp_path, rng)
    (tmp_path / "miniImageNet_category_split_val.pickle").unlink()
    write_pickle(tmp_path / "miniImageNet_category_split_test.pickle", {"data": images(rng, 9, 84)})
    write_pickle(tmp_path / "miniImageNet_category_split_train_phase_val.pickle",
                 {"data": rng.integers(0, 256, (12, 84, 84), dtype=np.uint8), "labels": [0] * 12})
    write_pickle(tmp_path / "miniImageNet_category_split_train_phase_test.pickle",
                 {"data": images(rng, 12, 84).astype(np.float32), "labels": [0] * 12})
    _, problems = read_fewshot(**{k: v for k, v in mini_config(tmp_path).items() if k in
                                  ("name", "source", "root", "files", "image_size", "images_per_class")},
                               classes={"train": 4, "novel_val": 2, "novel_test": 3})
    base = tmp_path / "miniImageNet_category_split_"
    assert problems == [
        f"{base}train_phase_val.pickle key 'data': expected shape (N, 84, 84, 3), got (12, 84, 84)",
        f"{base}train_phase_test.pickle key 'data': expected dtype uint8, got float32",
        f"missing file {base}val.pickle",
        f"{base}test.pickle: key 'labels' missing (keys present: ['data'])",
    ]
    with pytest.raises(DatasetNotFoundError, match=r"expected shape .* \(and 3 more problems\)"):
        fewshot(**mini_config(tmp_path))


def test_npz_and_label_problems_name_file_and_key(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train_images.npz", pixels=images(rng, 4, 84))
    write_pickle(tmp_path / "train_labels.pkl", {"labels": [0, 1, 2, 3]})
    (tmp_path / "val_images.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "test_images.npz", images=images(rng, 4, 84))
    write_pickle(tmp_path / "test_labels.pkl", {"labels": [0, 1, 2]})
    _, problems = read_fewshot("tiered_imagenet", "rfs", tmp_path, {"train": "train", "base_test": "train",
                               "novel_val": "val", "novel_test": "test"}, 84, {})
    assert problems[0] == f"{tmp_path / 'train_images.npz'}: key 'images' missing (keys present: ['pixels'])"
    assert problems[1].startswith(f"{tmp_path / 'val_images.npz'} is not a readable .npz archive")
    assert problems[2] == f"{tmp_path / 'test_labels.pkl'} key 'labels': 3 labels for 4 images"


def test_impossible_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.source='imagenet'"):
        fewshot(**config("cifar_fs", source="imagenet"))
    with pytest.raises(ConfigError, match="builds only"):
        fewshot(**config("mini_imagenet", source="cifar100"))
    with pytest.raises(ConfigError, match="dataset.files must map train, base_test"):
        fewshot(**config("fc100", files={"train": "train", "novel_val": "val", "novel_test": "test"}))


def test_verify_data_script_good_and_broken_files(tmp_path):
    good, broken = tmp_path / "good", tmp_path / "broken"
    for root in (good, broken):
        root.mkdir()
        write_mini(root, np.random.default_rng(0))
    (broken / "miniImageNet_category_split_val.pickle").unlink()
    test_file = broken / "miniImageNet_category_split_test.pickle"
    write_pickle(test_file, {"data": images(np.random.default_rng(1), 4, 84), "labels": [0, 6, 7, 8]})

    def command(root):  # the two runs go in parallel: each pays the interpreter and torch start-up
        return subprocess.Popen(
            [sys.executable, "scripts/verify_data.py", "dataset=mini_imagenet", f"dataset.root={root}",
             "dataset.num_classes=4", "dataset.classes.novel_val=2", "dataset.classes.novel_test=3",
             "dataset.images_per_class.novel_val=3", "dataset.images_per_class.novel_test=3"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [command(good), command(broken)]
    (good_out, good_err), (broken_out, _) = (run.communicate(timeout=120) for run in runs)
    assert runs[0].returncode == 0, good_out + good_err
    assert "every check passed" in good_out
    assert "novel_test test                     9 images    3 classes  84x84x3 uint8" in good_out
    assert runs[1].returncode == 2
    assert broken_out.strip().splitlines() == [  # one line per problem, each naming its file
        f"missing file {broken / 'miniImageNet_category_split_val.pickle'}",
        f"{test_file} (novel_test) key 'labels': 4 classes, expected 3",
        f"{test_file} (novel_test): 4 classes without 3 images each (class 0: 1, class 6: 1, class 7: 1...)",
        f"{broken / 'miniImageNet_category_split_train_phase_train.pickle'} (train) and {test_file} (novel_test) "
        f"share 1 class labels (e.g. 0); base and novel classes must be disjoint",
    ]


def test_verify_data_usage_and_overrides(tmp_path, cifar100_root, capsys):
    assert verify_data.main(["dataset=cifar10"]) == 2
    assert "not a few-shot dataset" in capsys.readouterr().out
    assert verify_data.main(["dataset=fc100", "root=x"]) == 2
    assert "unrecognised argument 'root=x'" in capsys.readouterr().out
    assert verify_data.main(["dataset=cifar_fs", f"dataset.root={tmp_path}"]) == 2
    assert capsys.readouterr().out.splitlines() == [f"missing file {tmp_path / name}.pickle"
                                                    for name in ("train", "val", "test")]
    # the partial CIFAR-100 has 4-22 images per class, not 600: reported, then accepted when disabled
    built = ["dataset=cifar_fs", "dataset.source=cifar100", f"dataset.root={cifar100_root}"]
    assert verify_data.main(built) == 2
    assert capsys.readouterr().out.count("classes without 600 images each") == 3
    assert verify_data.main(built + ["dataset.images_per_class=null"]) == 0
    out = capsys.readouterr().out
    assert "cifar100 source" in out and "64 classes" in out and "novel_test test" in out
