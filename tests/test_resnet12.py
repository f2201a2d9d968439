"""RFS's ResNet-12: parameter count by formula, feature-map sizes, DropBlock masks against explicit
loops (RFS's incomplete-block pairing and full blocks), the ramp, and train-only regularisation."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from opl.models import resnet12
from opl.models.resnet12 import DropBlock

from conftest import REPO


def expected_parameters(widths=(64, 160, 320, 640), in_channels=3, num_classes=64):
    """Per block (i -> o): three 3x3 convs 9*i*o + 2*9*o*o, a 1x1 shortcut i*o, four BatchNorms
    (weight + bias) 8*o; then the classifier 640 * C + C."""
    total, i = 0, in_channels
    for o in widths:
        total += 9 * i * o + 18 * o * o + i * o + 8 * o
        i = o
    return total + widths[-1] * num_classes + num_classes


def test_parameter_count():
    assert expected_parameters() == 12_465_344
    assert sum(p.numel() for p in resnet12(64).parameters()) == expected_parameters()
    assert sum(p.numel() for p in resnet12(351).parameters()) == expected_parameters(num_classes=351)


@pytest.mark.parametrize("size,maps", [(84, [42, 21, 10, 5]), (32, [16, 8, 4, 2])])
def test_shapes_and_signed_features(size, maps):
    model = resnet12(10, dropblock_size=5 if size == 84 else 2).eval()
    seen = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name)[0].register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape[1:])))
    features, logits = model(torch.randn(2, 3, size, size))
    assert features.shape == (2, 640) and logits.shape == (2, 10)
    assert seen == [(w, s, s) for w, s in zip((64, 160, 320, 640), maps)]
    assert torch.allclose(logits, model.classifier(features))
    assert (features < 0).any()  # LeakyReLU: signed features, where OPL's neg_abs mode matters


def rfs_pairing_reference(seeds, bs):
    """RFS's _compute_block_mask as a loop: row r of the tiled lists pairs seed r mod n with offset
    r mod bs^2; the seed itself is copied in at offset ((bs-1)//2, (bs-1)//2) by the padding."""
    b, c, h, w = seeds.shape
    dropped = torch.zeros(b, c, h + bs - 1, w + bs - 1)
    listed = [tuple(index) for index in seeds.nonzero().tolist()]  # row-major
    lead = (bs - 1) // 2
    for (n, ch, i, j) in listed:
        dropped[n, ch, i + lead, j + lead] = 1
    for r in range(len(listed) * bs * bs):
        n, ch, i, j = listed[r % len(listed)]
        o = r % (bs * bs)
        dropped[n, ch, i + o // bs, j + o % bs] = 1
    return 1 - dropped


def full_block_reference(seeds, bs):
    b, c, h, w = seeds.shape
    kept = torch.ones(b, c, h + bs - 1, w + bs - 1)
    for n, ch, i, j in seeds.nonzero().tolist():
        kept[n, ch, i:i + bs, j:j + bs] = 0
    return kept


@pytest.mark.parametrize("bs,size", [(5, 10), (5, 5), (2, 4), (2, 2), (3, 7)])
def test_block_masks_against_explicit_loops(bs, size):
    generator = torch.Generator().manual_seed(bs * 100 + size)
    incomplete = 0
    for trial in range(40):
        seeds = (torch.rand(2, 3, size - bs + 1, size - bs + 1, generator=generator) < 0.25).float()
        if not seeds.any():
            continue
        rfs = DropBlock(bs, "rfs").block_mask(seeds)
        assert torch.equal(rfs, rfs_pairing_reference(seeds, bs))
        assert torch.equal(DropBlock(bs, "full").block_mask(seeds), full_block_reference(seeds, bs))
        incomplete += int(not torch.equal(rfs, full_block_reference(seeds, bs)))
    if bs == 2:  # every even number of seeds leaves RFS's blocks incomplete
        assert incomplete > 0


def test_dropblock_only_in_training_and_rescaled():
    block = DropBlock(2, "full")
    x = torch.rand(8, 16, 4, 4) + 0.5
    rate = torch.tensor(0.1)
    assert torch.equal(block.eval()(x, rate), x)
    assert torch.equal(block.train()(x, torch.tensor(0.0)), x)  # no seeds at rate 0
    torch.manual_seed(0)
    out = block(x, rate)
    kept = out != 0
    assert 0 < (~kept).sum() < kept.sum()
    scale = (out[kept] / x[kept]).unique()
    assert torch.allclose(scale, torch.tensor(x.numel() / kept.sum().item()))


def test_dropblock_gamma_is_rfs_formula():
    """gamma = rate / bs^2 * H^2 / (H - bs + 1)^2 (rfs models/resnet.py:141), here at 10x10, bs 5."""
    block = DropBlock(5, "full").train()
    captured = []
    real_bernoulli = torch.bernoulli
    torch.bernoulli = lambda p: captured.append(p) or real_bernoulli(p)
    try:
        block(torch.ones(2, 3, 10, 10), torch.tensor(0.08))
    finally:
        torch.bernoulli = real_bernoulli
    assert captured[0].shape == (2, 3, 6, 6)
    assert captured[0].unique().item() == pytest.approx(0.08 / 25 * 100 / 36)


def test_dropblock_ramp_counts_training_passes_and_survives_state_dict():
    model = resnet12(5, dropblock_size=2)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    first = model(x)[0]
    assert torch.equal(first, model(x)[0]) and model.dropblock_step.item() == 0  # eval: not counted
    model.train()
    model(x)
    model(x)
    assert model.dropblock_step.item() == 2
    assert model.dropblock_rate().item() == pytest.approx(0.1 * 2 / 40_000)
    for step, rate in ((20_000, 0.05), (40_000, 0.1), (90_000, 0.1)):  # the count as a checkpoint restores it
        model.load_state_dict({**model.state_dict(), "dropblock_step": torch.tensor(step)})
        assert model.dropblock_step.item() == step and model.dropblock_rate().item() == pytest.approx(rate)
    restored = resnet12(5, dropblock_size=2)
    restored.load_state_dict(model.state_dict())
    assert restored.dropblock_step.item() == 90_000
    # at the full rate, training passes differ (dropout + DropBlock), evaluation passes do not
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_model_config_instantiates():
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        mini = compose("train", overrides=["dataset=mini_imagenet", "model=resnet12"])
        cifar = compose("train", overrides=["dataset=cifar_fs", "model=resnet12_cifar"])
    model = instantiate(mini.model)
    assert (model.classifier.out_features, model.layer3[0].DropBlock.block_size) == (64, 5)
    assert (model.dropblock_ramp_steps, model.drop_rate, model.layer3[0].DropBlock.mask) == (40_000, 0.1, "rfs")
    assert model.layer1[0].DropBlock is None and model.layer4[0].DropBlock is not None
    assert instantiate(cifar.model).layer4[0].DropBlock.block_size == 2
    assert math.isclose(cifar.dataset.mean[0], 0.5071)
