"""BatchAugment against per-sample torchvision references, its parameter sampler, and pil_transforms."""

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from opl.data.augment import BatchAugment, pil_transforms
from opl.data.base import AugmentSpec

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
FULL = AugmentSpec(crop_padding=4, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4)
JITTER_REFERENCE = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def random_images(b, c=3, size=32, seed=0):
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_sample(img_u8, params, b, padding=4, order_override=None):
    """torchvision, one sample: pad + crop(top=offsets[b,0], left=offsets[b,1]), hflip, jitter in order."""
    x = img_u8.to(torch.float32) / 255.0
    h, w = x.shape[-2:]
    if "offsets" in params:
        top, left = (int(v) for v in params["offsets"][b])
        x = TF.crop(TF.pad(x, padding), top, left, h, w)
    if "flip" in params and bool(params["flip"][b]):
        x = TF.hflip(x)
    if "factors" in params:
        order = params["order"][b].tolist() if order_override is None else order_override
        for op in order:
            x = JITTER_REFERENCE[op](x, float(params["factors"][b, op]))
    return x


def reference_batch(images, params, **kw):
    return torch.stack([reference_sample(images[b], params, b, **kw) for b in range(images.shape[0])])


def all_orders(b, seed):
    """`b` rows of jitter orders cycling through all 6 permutations, and random factors in [0.6, 1.4]."""
    perms = list(itertools.permutations(range(3)))
    order = torch.tensor([perms[i % 6] for i in range(b)])
    factors = 0.6 + 0.8 * torch.rand(b, 3, generator=torch.Generator().manual_seed(seed))
    return order, factors


# --------------------------------------------------------------------------- apply vs torchvision


def test_crop_matches_torchvision_pad_then_crop():
    """offsets[:, 0] is the top (row) and offsets[:, 1] the left (column) of the zero-padded crop."""
    images = random_images(7, seed=1)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [2, 5], [5, 2], [4, 4]])
    aug = BatchAugment(AugmentSpec(crop_padding=4), MEAN, STD)
    out = aug.apply(images, {"offsets": offsets})
    assert out.shape == (7, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_batch(images, {"offsets": offsets}), rtol=0, atol=0)
    # (0, 8) shifts the image left and pads on the right; (8, 0) pads on the left instead
    assert (out[2, :, :4, :] == 0).all() and (out[2, :, :, -4:] == 0).all()
    assert (out[3, :, -4:, :] == 0).all() and (out[3, :, :, :4] == 0).all()
    torch.testing.assert_close(out[6], images[6].float() / 255.0, rtol=0, atol=0)  # centre crop = identity


def test_flip_matches_torchvision_hflip():
    """flip[b] True mirrors sample b horizontally (last axis); False leaves it unchanged."""
    images = random_images(5, seed=2)
    flip = torch.tensor([True, False, True, True, False])
    out = BatchAugment(AugmentSpec(hflip=True), MEAN, STD).apply(images, {"flip": flip})
    torch.testing.assert_close(out, reference_batch(images, {"flip": flip}), rtol=0, atol=0)
    assert not torch.equal(out[0], images[0].float() / 255.0)


def test_jitter_matches_torchvision_in_per_sample_order():
    """Brightness/contrast/saturation with per-sample factors, applied in params['order'] per sample."""
    images = random_images(12, seed=3)
    order, factors = all_orders(12, seed=4)
    params = {"factors": factors, "order": order}
    spec = AugmentSpec(brightness=0.4, contrast=0.4, saturation=0.4)
    out = BatchAugment(spec, MEAN, STD).apply(images, params)
    ref = reference_batch(images, params)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # the order matters (clamping makes the ops non-commuting): a fixed order gives other images
    fixed = reference_batch(images, params, order_override=[0, 1, 2])
    differs = [(fixed[b] - ref[b]).abs().max().item() > 1e-3 for b in range(12)]
    assert sum(differs) >= 4


def test_full_pipeline_matches_torchvision():
    """Sampled crop + flip + jitter together equal the per-sample torchvision chain."""
    images = random_images(16, seed=5)
    aug = BatchAugment(FULL, MEAN, STD)
    params = aug.sample_params(images, torch.Generator().manual_seed(6))
    assert set(params) == {"offsets", "flip", "factors", "order"}
    torch.testing.assert_close(aug.apply(images, params), reference_batch(images, params), rtol=0, atol=1e-5)


def test_single_channel_images():
    """1-channel images: contrast uses the plain mean, saturation is the identity (as torchvision)."""
    images = random_images(12, c=1, seed=7)
    order, factors = all_orders(12, seed=8)
    aug = BatchAugment(FULL, (0.5,), (0.25,))
    params = {"offsets": torch.randint(0, 9, (12, 2), generator=torch.Generator().manual_seed(9)),
              "flip": torch.arange(12) % 3 == 0, "factors": factors, "order": order}
    out = aug.apply(images, params)
    assert out.shape == (12, 1, 32, 32)
    torch.testing.assert_close(out, reference_batch(images, params), rtol=0, atol=1e-5)
    # saturation alone changes nothing on one channel
    sat_only = {"factors": torch.tensor([[1.0, 1.0, 0.2]]).expand(12, 3), "order": order}
    torch.testing.assert_close(aug.apply(images, sat_only), images.float() / 255.0, rtol=0, atol=1e-6)


def test_apply_does_not_modify_input():
    """The uint8 input batch is left untouched."""
    images = random_images(4, seed=10)
    before = images.clone()
    aug = BatchAugment(FULL, MEAN, STD)
    aug.apply(images, aug.sample_params(images, torch.Generator().manual_seed(0)))
    assert torch.equal(images, before)


# --------------------------------------------------------------------------- forward


def test_eval_forward_is_plain_normalisation():
    """forward(train=False) = (x / 255 - mean) / std, no randomness."""
    images = random_images(3, seed=11)
    aug = BatchAugment(FULL, MEAN, STD)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255.0 - mean) / std
    out = aug(images, train=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(aug(images, train=False), out, rtol=0, atol=0)


def test_train_forward_is_normalised_reference_and_seeded():
    """forward(train=True, generator) = normalise(torchvision chain with the same seeded params)."""
    images = random_images(8, seed=12)
    aug = BatchAugment(FULL, MEAN, STD)
    out = aug(images, train=True, generator=torch.Generator().manual_seed(13))
    params = aug.sample_params(images, torch.Generator().manual_seed(13))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (reference_batch(images, params) - mean) / std, rtol=0, atol=1e-4)
    other = aug(images, train=True, generator=torch.Generator().manual_seed(14))
    assert not torch.allclose(out, other)


# --------------------------------------------------------------------------- sample_params


@pytest.fixture(scope="module")
def many_params():
    images = torch.zeros(12000, 3, 1, 1, dtype=torch.uint8)  # only the batch size matters
    return BatchAugment(FULL, MEAN, STD).sample_params(images, torch.Generator().manual_seed(123))


def test_offsets_uniform_over_0_to_8(many_params):
    """Crop offsets are integers in 0..2*padding, each value ~1/9 of the time, for rows and columns."""
    offsets = many_params["offsets"]
    assert offsets.shape == (12000, 2)
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert counts.numel() == 9  # nothing above 8
        assert offsets[:, axis].min() == 0
        expected = 12000 / 9
        assert ((counts - expected).abs() < 0.12 * expected).all(), counts.tolist()
    # rows and columns are drawn independently
    assert (offsets[:, 0] != offsets[:, 1]).float().mean() > 0.8


def test_flip_rate_near_half(many_params):
    """Each sample is flipped with probability 0.5."""
    flip = many_params["flip"]
    assert flip.dtype == torch.bool and flip.shape == (12000,)
    assert abs(flip.float().mean().item() - 0.5) < 0.02


def test_factors_inside_range_and_spread(many_params):
    """Jitter factors are uniform in [1 - 0.4, 1 + 0.4] for each of the three ops."""
    factors = many_params["factors"]
    assert factors.shape == (12000, 3)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert (factors.min(dim=0).values < 0.62).all() and (factors.max(dim=0).values > 1.38).all()
    assert ((factors.mean(dim=0) - 1.0).abs() < 0.02).all()
    assert ((factors.std(dim=0) - 0.8 / 12 ** 0.5).abs() < 0.02).all()  # uniform, not clustered


def test_every_order_permutation_appears(many_params):
    """Each row of `order` is a permutation of (0, 1, 2) and all 6 appear about equally often."""
    order = many_params["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(3).expand(12000, 3))
    seen = {}
    for row in order.tolist():
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    assert set(seen) == set(itertools.permutations(range(3)))
    assert all(abs(c - 2000) < 250 for c in seen.values()), seen


def test_strength_bounds_follow_spec():
    """Disabled ops get factor 1; a strength above 1 gives factors in [0, 1 + x]."""
    spec = AugmentSpec(brightness=1.5, contrast=0.0, saturation=0.2)
    images = torch.zeros(4000, 3, 1, 1, dtype=torch.uint8)
    p = BatchAugment(spec, MEAN, STD).sample_params(images, torch.Generator().manual_seed(1))
    assert set(p) == {"factors", "order"}
    assert p["factors"][:, 0].min() >= 0.0 and p["factors"][:, 0].max() <= 2.5
    assert p["factors"][:, 0].min() < 0.05 and p["factors"][:, 0].max() > 2.4
    assert torch.equal(p["factors"][:, 1], torch.ones(4000))
    assert p["factors"][:, 2].min() >= 0.8 and p["factors"][:, 2].max() <= 1.2


def test_sampling_is_deterministic_per_seed():
    """Same generator seed -> identical params; a different seed -> different params."""
    images = torch.zeros(64, 3, 1, 1, dtype=torch.uint8)
    aug = BatchAugment(FULL, MEAN, STD)
    a = aug.sample_params(images, torch.Generator().manual_seed(7))
    b = aug.sample_params(images, torch.Generator().manual_seed(7))
    c = aug.sample_params(images, torch.Generator().manual_seed(8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("offsets", "flip", "factors", "order"):
        assert not torch.equal(a[key], c[key]), key


# --------------------------------------------------------------------------- pil_transforms


def test_pil_eval_transform_is_to_tensor_and_normalize():
    """pil_transforms(train=False) = ToTensor + Normalize of the same uint8 image, and matches BatchAugment."""
    images = random_images(2, seed=20)
    tf = pil_transforms(FULL, MEAN, STD, train=False, image_size=32)
    assert not any(isinstance(t, (T.RandomCrop, T.RandomHorizontalFlip, T.ColorJitter)) for t in tf.transforms)
    aug = BatchAugment(FULL, MEAN, STD)
    for b in range(2):
        hwc = images[b].permute(1, 2, 0).numpy()
        out = tf(Image.fromarray(hwc))
        expected = (hwc.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
        torch.testing.assert_close(out.double(), torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, aug(images[b:b + 1], train=False)[0], rtol=0, atol=1e-5)


def test_pil_train_transform_composition():
    """pil_transforms(train=True) is RandomCrop(pad) -> HFlip -> ColorJitter -> ToTensor -> Normalize."""
    tf = pil_transforms(FULL, MEAN, STD, train=True, image_size=32)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.RandomCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToTensor, T.Normalize]
    crop, _, jitter = tf.transforms[:3]
    assert crop.size == (32, 32) and crop.padding == 4
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue is None
