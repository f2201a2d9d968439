"""PACS: the list reader on the real lists, its errors on small fixture lists, the built DataSpec,
and the RSC code's transforms (only a handful of real images are decoded)."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from torchvision import transforms as T

from conftest import SHARED_DATA, require
from opl.data.augment import append_mirrored
from opl.data.base import AugmentSpec
from opl.data.pacs import CLASSES, DOMAINS, pacs, read_split_list, rsc_eval_transform, rsc_train_transform
from opl.errors import ConfigError, DatasetNotFoundError

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/dataset/pacs.yaml").read_text())
# Lines per list (train / crossval / test), as published with PACS; test = the whole domain.
COUNTS = {"art_painting": (1840, 208, 2048), "cartoon": (2107, 237, 2344), "photo": (1499, 171, 1670),
          "sketch": (3531, 398, 3929)}
PARTS = ("train", "crossval", "test")


def to_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def build(root, **overrides):
    kwargs = {k: v for k, v in CONFIG.items() if k != "_target_"}
    kwargs.update(root=str(root), **overrides)
    return pacs(**kwargs)


@pytest.fixture(scope="module")
def pacs_root() -> Path:
    return require(SHARED_DATA / "pacs")


def read_real(root, folder, domain, part, tolerated=frozenset()):
    return read_split_list(root / folder / f"{domain}_{part}_kfold.txt", domain, root / "PACS", tolerated)


def test_real_corrected_lists_counts_and_label_mapping(pacs_root):
    for domain, counts in COUNTS.items():
        lists = {part: read_real(pacs_root, "splits", domain, part) for part in PARTS}
        assert tuple(len(lists[p].entries) for p in PARTS) == counts
        assert all(not s.dropped for s in lists.values())
        paths = {p: {e.path for e in lists[p].entries} for p in PARTS}
        # train and crossval partition the domain; the test list is the whole domain
        assert not paths["train"] & paths["crossval"] and paths["train"] | paths["crossval"] == paths["test"]
        on_disk = {p.relative_to(pacs_root / "PACS").as_posix() for p in (pacs_root / "PACS" / domain).glob("*/*")}
        assert paths["test"] == on_disk
        # 1-based labels become 0..6 in the order of CLASSES, which is also the class folder of each file
        for entry in lists["test"].entries:
            assert CLASSES[entry.label] == entry.path.split("/")[1]
    first = read_real(pacs_root, "splits", "art_painting", "train").entries[0]
    assert (first.path, first.label, first.line) == ("art_painting/dog/pic_333.jpg", 0, 1)  # "... 1" in the file
    last = read_real(pacs_root, "splits", "photo", "test").entries[-1]
    assert last.path.startswith("photo/person/") and last.label == 6  # "... 7" in the file


def test_official_lists_differ_in_exactly_the_two_known_lines(pacs_root):
    differences = []
    for domain in DOMAINS:
        for part in PARTS:
            name = f"{domain}_{part}_kfold.txt"
            corrected = (pacs_root / "splits" / name).read_text().splitlines()
            official = (pacs_root / "splits_official" / name).read_text().splitlines()
            assert len(corrected) == len(official)
            differences += [(name, i + 1, c, o) for i, (c, o) in enumerate(zip(corrected, official)) if c != o]
    assert differences == [
        ("art_painting_crossval_kfold.txt", 1, "art_painting/dog/pic_225.jpg 1", "art_painting/dog/pic_225.jpg 0"),
        ("art_painting_crossval_kfold.txt", 2, "art_painting/dog/pic_249.jpg 1", "art_painting/dog/pic_248.jpg 1"),
    ]
    # Read strictly, the official list fails on its first line; the duplicate is line 17 repeating line 2.
    with pytest.raises(DatasetNotFoundError, match=r"splits_official/art_painting_crossval_kfold.txt:1: label 0 "):
        read_real(pacs_root, "splits_official", "art_painting", "crossval")


def test_official_build_drops_the_two_defects_with_a_warning(pacs_root):
    with pytest.warns(UserWarning, match="2 known defective line") as record:
        spec = build(pacs_root, target="photo", splits="official")
    message = str(record[0].message)
    assert "art_painting_crossval_kfold.txt:1: 'art_painting/dog/pic_225.jpg 0'" in message
    assert "art_painting_crossval_kfold.txt:17: 'art_painting/dog/pic_248.jpg 1'" in message
    assert "repeats line 2" in message
    assert len(spec.notes["dropped_list_lines"]) == 2
    # art crossval loses pic_225 (label 0) and has pic_248 once; pic_249 is in no official train/crossval list
    art = spec.val.domain_names.index("art_painting")
    art_val = {p for p, d in zip(spec.val.paths, spec.val.domains.tolist()) if d == art}
    corrected = build(pacs_root, target="photo")
    corrected_art_val = {p for p, d in zip(corrected.val.paths, corrected.val.domains.tolist()) if d == art}
    assert corrected_art_val - art_val == {"art_painting/dog/pic_225.jpg", "art_painting/dog/pic_249.jpg"}
    assert art_val <= corrected_art_val and len(spec.val) == len(corrected.val) - 2
    assert spec.train.paths == corrected.train.paths and spec.test.paths == corrected.test.paths
    assert spec.variant == "pacs/official|target=photo|size=222" and spec.fingerprint != corrected.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrected lists read without any warning
        build(pacs_root, target="art_painting")


def test_built_dataspec_for_one_target(pacs_root):
    spec = build(pacs_root, target="cartoon")
    assert spec.variant == "pacs/corrected|target=cartoon|size=222" and spec.num_classes == 7
    assert (len(spec.train), len(spec.val), len(spec.test)) == (1840 + 1499 + 3531, 208 + 171 + 398, 2344)
    assert spec.train.domain_names == spec.val.domain_names == ("art_painting", "photo", "sketch")
    assert torch.bincount(spec.train.domains).tolist() == [1840, 1499, 3531]
    assert torch.bincount(spec.val.domains).tolist() == [208, 171, 398]
    assert spec.test.domain_names == ("cartoon",) and set(spec.test.domains.tolist()) == {0}
    assert torch.bincount(spec.test.labels, minlength=7).sum() == 2344 and spec.test.labels.max() == 6
    assert spec.augment == AugmentSpec(mirror_batch=True)  # the device only normalises, then appends the mirror
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.notes["sources"] == ["art_painting", "photo", "sketch"] and spec.notes["dropped_list_lines"] == []
    assert spec.fingerprint == build(pacs_root, target="cartoon").fingerprint == "85819e5c66454645"  # as recorded
    assert spec.fingerprint != build(pacs_root, target="sketch").fingerprint
    for split, i in ((spec.train, 0), (spec.val, len(spec.val) - 1), (spec.test, 100)):
        image, label = split[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 222, 222)
        assert label == int(split.labels[i]) and CLASSES[label] == split.paths[i].split("/")[1]
    small = build(pacs_root, target="cartoon", limit_train=40, image_size=64)
    assert len(small.train) == 40 and small.variant == "pacs/corrected|target=cartoon|size=64|train=40@0"
    assert small.train.domains.tolist() == [spec.train.domains[spec.train.paths.index(p)].item() for p in small.train.paths]
    assert small.test[0][0].shape == (3, 64, 64)


def test_eval_transform_is_a_bilinear_resize_to_uint8(pacs_root):
    spec = build(pacs_root, target="sketch")
    for i in (0, 1234):
        path = pacs_root / "PACS" / spec.test.paths[i]
        reference = Image.open(path).convert("RGB").resize((222, 222), Image.BILINEAR)
        assert torch.equal(spec.test[i][0], to_chw(reference))


def test_train_transform_is_seeded_and_uses_the_configured_values(pacs_root):
    spec = build(pacs_root, target="sketch")
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(spec.train[7][0])
    assert draws[0].dtype == torch.uint8 and draws[0].shape == (3, 222, 222)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    crop, flip, jitter, gray, to_tensor = spec.train.transform.transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (222, 222)
    assert crop.scale == (0.8, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.4, 0.4))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.1 and isinstance(to_tensor, T.PILToTensor)


def test_train_transform_order_against_pil_reference(pacs_root):
    """With every random step forced (whole-image crop, flip and greyscale always, no jitter) the
    pipeline is resize -> mirror -> greyscale, as PIL computes it directly."""
    transform = rsc_train_transform(96, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, brightness=0.0,
                                    contrast=0.0, saturation=0.0, hue=0.0, grayscale=1.0)
    image = Image.open(min((pacs_root / "PACS/photo/horse").iterdir())).convert("RGB")
    reference = ImageOps.mirror(image.resize((96, 96), Image.BILINEAR)).convert("L").convert("RGB")
    assert torch.equal(transform(image), to_chw(reference))
    assert torch.equal(rsc_eval_transform(96)(image), to_chw(image.resize((96, 96), Image.BILINEAR)))


def test_append_mirrored_doubles_the_batch():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    labels = torch.tensor([5, 1])
    both, both_labels = append_mirrored(images, labels)
    assert both.shape == (4, 3, 2, 4) and both_labels.tolist() == [5, 1, 5, 1]
    assert torch.equal(both[:2], images)
    for b in range(2):
        for w in range(4):
            assert torch.equal(both[2 + b, :, :, w], images[b, :, :, 3 - w])


# ---- errors on small fixture trees --------------------------------------------------------------

def tiny_pacs(root: Path) -> Path:
    """Two images per domain (dog, person), every list present: train = first, crossval = second."""
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        lines = []
        for cls, label in (("dog", 1), ("person", 7)):
            folder = root / "PACS" / domain / cls
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
            lines.append(f"{domain}/{cls}/a.png {label}")
        for folder in ("splits", "splits_official"):
            (root / folder).mkdir(exist_ok=True)
            for part, chosen in (("train", lines[:1]), ("crossval", lines[1:]), ("test", lines)):
                (root / folder / f"{domain}_{part}_kfold.txt").write_text("\n".join(chosen) + "\n")
    return root


def write_list(root: Path, lines: list[str]) -> Path:
    path = root / "splits" / "cartoon_test_kfold.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = "cartoon/dog/a.png 1"


@pytest.mark.parametrize("bad, line, reason", [
    ("cartoon/dog/missing.png 1", 2, "does not exist under"),
    ("cartoon/dog/a.png 0", 2, "label 0 is outside 1..7"),
    ("cartoon/person/a.png 8", 2, "label 8 is outside 1..7"),
    (GOOD, 2, "repeats line 1"),
    ("cartoon/dog/a.png", 2, "malformed line"),
    ("cartoon/dog/a.png one", 2, "malformed line"),
    ("cartoon/dog/a.png --1", 2, "malformed line"),
    ("cartoon/dog/a.png 1 extra", 2, "malformed line"),
    ("cartoon/person/a.png 1", 2, "has label 1 (dog) but lies in the person folder"),
    ("sketch/dog/a.png 1", 2, "not a 'cartoon/<class>/<file>' path"),
])
def test_list_errors_name_file_and_line(tmp_path, bad, line, reason):
    root = tiny_pacs(tmp_path)
    list_file = write_list(root, [GOOD, bad])
    with pytest.raises(DatasetNotFoundError, match=re.escape(reason)) as info:
        read_split_list(list_file, "cartoon", root / "PACS")
    assert str(info.value).startswith(f"{list_file}:{line}: ") and "\n" not in str(info.value)


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    root = tiny_pacs(tmp_path)
    entries = read_split_list(write_list(root, ["", GOOD, "  ", "cartoon/person/a.png 7"]), "cartoon", root / "PACS").entries
    assert [(e.line, e.label) for e in entries] == [(2, 0), (4, 6)]


def test_builder_validates_names_and_root(tmp_path):
    root = tiny_pacs(tmp_path)
    with pytest.raises(ConfigError, match="art_painting, cartoon, photo, sketch"):
        build(root, target="Sketch")
    with pytest.raises(ConfigError, match="corrected, official"):
        build(root, target="sketch", splits="fixed")
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):
        build("", target="sketch")
    with pytest.raises(DatasetNotFoundError, match="no PACS images at"):
        build(tmp_path / "nowhere", target="sketch")
    (root / "splits" / "photo_crossval_kfold.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="photo_crossval_kfold.txt is missing"):
        build(root, target="sketch")


def test_builder_rejects_train_crossval_overlap(tmp_path):
    root = tiny_pacs(tmp_path)
    (root / "splits" / "photo_crossval_kfold.txt").write_text("photo/dog/a.png 1\n")
    with pytest.raises(DatasetNotFoundError, match=r"photo_crossval_kfold.txt:1: .* is also in .*photo_train_kfold.txt:1"):
        build(root, target="sketch")


def test_only_the_known_official_defects_are_tolerated(tmp_path):
    root = tiny_pacs(tmp_path)
    (root / "splits_official" / "photo_crossval_kfold.txt").write_text("photo/person/a.png 0\n")
    with pytest.raises(DatasetNotFoundError, match="photo_crossval_kfold.txt:1: label 0"):
        build(root, target="sketch", splits="official")


def test_fingerprint_follows_list_contents_and_file_sizes(tmp_path):
    root = tiny_pacs(tmp_path)
    spec = build(root, target="sketch", image_size=32)
    assert len(spec.train) == 3 and len(spec.val) == 3 and len(spec.test) == 2 and spec.test[1][0].shape == (3, 32, 32)
    with open(root / "PACS/photo/dog/a.png", "ab") as f:
        f.write(b"\0")
    grown = build(root, target="sketch", image_size=32)
    test_list = root / "splits" / "sketch_test_kfold.txt"
    test_list.write_text("sketch/person/a.png 7\nsketch/dog/a.png 1\n")  # the same lines, reordered
    reordered = build(root, target="sketch", image_size=32)
    assert len({spec.fingerprint, grown.fingerprint, reordered.fingerprint}) == 3
    assert reordered.test.paths == ["sketch/person/a.png", "sketch/dog/a.png"]
