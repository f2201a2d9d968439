"""RSC muting: a hand-computed example, a brute-force loop reference on random inputs, the RSC
code's counts and curriculum, the gradient against finite differences, and determinism."""

import json
import math
from dataclasses import replace
from pathlib import Path

import types

import pytest
import torch
import yaml
from torch import nn

from conftest import SHARED_DATA, require
from opl.data.pacs import pacs
from opl.engine.trainer import Trainer, TrainerConfig
from opl.errors import ConfigError
from opl.losses import ce_plus_opl
from opl.methods import RSCStep
from opl.models import MLP
from opl.config_types import check_targets
from opl.data.base import DataSpec, ImageTensors
from opl.methods.rsc import (RSCSettings, draw_spatial, keep_mask, most_dropped, muted_count, rsc_mask,
                             true_class_score_grad)

OFFSET = 1e-4


def settings(spatial_probability=0.5, batch_fraction=0.5, step=0.0, **overrides):
    values = dict(spatial_fraction=1 / 3, channel_fraction=1 / 3.2, spatial_probability=spatial_probability,
                  batch_fraction_start=batch_fraction, batch_fraction_step=step, batch_fraction_interval=10,
                  confidence_offset=OFFSET)
    return RSCSettings(**{**values, **overrides})


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """logits = W @ (spatial mean of the feature map) + b, the RSC model's avgpool + fc."""
    def classify(features):
        logits = features.mean(dim=(2, 3)) @ weight.T
        return logits if bias is None else logits + bias
    return classify


# ---- hand-computed example ----------------------------------------------------------------------
# B=4 samples, C=2 channels, 2x2 maps (positions p0..p3 row-major), 2 classes, W = [[2, -1], [-1, 1]].
# d logit_y / d f[c, p] = W[y, c] / 4, so the channel scores are (0.5, -0.25) for y=0 and
# (-0.25, 0.25) for y=1, and the spatial score of p is sum_c f[c, p] W[y, c] / 4.
# Spatial: k = ceil(4/3) = 2, positions scoring strictly above the 3rd largest are muted.
# Channel: k = ceil(2 * 0.3125) = 1, the channel scoring above the smaller one is muted.
# Batch fraction 0.5: m = round(4 * 0.5) = 2, samples dropping strictly more than the 3rd largest drop.
W = torch.tensor([[2.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 0, 1])
CHANNEL0 = [[4, 0, 2, 1], [1, 3, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
CHANNEL1 = [[0, 4, 0, 2], [2, 2, 6, 2], [0, 0, 0, 8], [1, 2, 3, 4]]
FEATURES = torch.tensor([CHANNEL0, CHANNEL1], dtype=torch.float64).permute(1, 0, 2).reshape(4, 2, 2, 2)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_hand_example_spatial():
    # spatial scores: s0 (y=0) 0.5*f0 - 0.25*f1 = [2, -1, 1, -0.5] -> mute p0, p2
    #                 s1 (y=1) 0.25*(f1 - f0) = [0.25, -0.25, 1.5, 0.5] -> mute p2, p3
    #                 s2 (y=0) [0.5, 0.5, 0.5, -1.5]: the 3rd largest is 0.5, nothing is above it -> none
    #                 s3 (y=1) [0.25, 0.5, 0.75, 1] -> mute p2, p3
    # confidence p(y) = sigmoid(logit_y - logit_other) before -> after muting:
    #   s0: pooled (1.75, 1.5) -> logits (2, -0.25); after (0.25, 1.5) -> (-1, 1.25)
    #   s1: pooled (1, 3) -> (-1, 2); after (1, 1) -> (1, 0)
    #   s2: unchanged -> drop -1e-4 -> 0
    #   s3: pooled (0, 2.5) -> (-2.5, 2.5); after (0, 0.75) -> (-0.75, 0.75)
    drops = [sigmoid(2.25) - sigmoid(-2.25) - OFFSET, sigmoid(3) - sigmoid(-1) - OFFSET, 0.0,
             sigmoid(5) - sigmoid(1.5) - OFFSET]  # 0.8092, 0.6835, 0, 0.1756 -> threshold 0.1756: s0, s1
    result = rsc_mask(FEATURES, LABELS, linear_head(W), settings(spatial_probability=1.0), epoch=0)
    assert result.spatial and result.mask.shape == (4, 1, 2, 2)
    assert result.confidence_drop.tolist() == pytest.approx(drops, abs=1e-12)
    assert result.selected.tolist() == [True, True, False, False]
    assert result.mask.reshape(4, 4).tolist() == [[0, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # with batch fraction 0.25, m = round(1.0) = 1: only the largest drop (s0) keeps its mask
    top = rsc_mask(FEATURES, LABELS, linear_head(W), settings(spatial_probability=1.0, batch_fraction=0.25), epoch=0)
    assert top.selected.tolist() == [True, False, False, False]


def test_hand_example_channel():
    # channel masks: y=0 mutes channel 0, y=1 mutes channel 1.
    #   s0: (2, -0.25) -> pooled (0, 1.5) -> (-1.5, 1.5)        drop sigmoid(2.25) - sigmoid(-3)
    #   s1: (-1, 2) -> pooled (1, 0) -> (2, -1)                 drop sigmoid(3) - sigmoid(-3)
    #   s2: pooled (1, 2) -> (0, 1); after (0, 2) -> (-2, 2)    drop sigmoid(-1) - sigmoid(-4)
    #   s3: (-2.5, 2.5) -> pooled (0, 0) -> (0, 0)              drop sigmoid(5) - 0.5
    drops = [sigmoid(2.25) - sigmoid(-3) - OFFSET, sigmoid(3) - sigmoid(-3) - OFFSET,
             sigmoid(-1) - sigmoid(-4) - OFFSET, sigmoid(5) - 0.5 - OFFSET]  # 0.857, 0.905, 0.251, 0.493
    result = rsc_mask(FEATURES, LABELS, linear_head(W), settings(spatial_probability=0.0), epoch=0)
    assert not result.spatial and result.mask.shape == (4, 2, 1, 1)
    assert result.confidence_drop.tolist() == pytest.approx(drops, abs=1e-12)
    assert result.selected.tolist() == [True, True, False, False]  # above the 3rd largest (0.493)
    assert result.mask.reshape(4, 2).tolist() == [[0, 1], [1, 0], [1, 1], [1, 1]]


# ---- brute-force loop reference -----------------------------------------------------------------

def reference_mask(features, labels, weight, bias, s: RSCSettings, spatial: bool, epoch: int):
    """The RSC recipe written out per sample with Python floats; the gradient of a linear head on
    the spatial mean is analytic: d logit_y / d f[c, p] = W[y, c] / (H W)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w).tolist()
    wt, bs = weight.tolist(), bias.tolist()
    masks, drops = [], []
    for i in range(b):
        y = int(labels[i])
        channel_score = [wt[y][ch] / (h * w) for ch in range(c)]
        if spatial:
            scores = [sum(f[i][ch][p] * channel_score[ch] for ch in range(c)) for p in range(h * w)]
            k = math.ceil(h * w / 3.0) if s.spatial_fraction == 1 / 3 else math.ceil(h * w * s.spatial_fraction)
        else:
            scores = channel_score
            k = math.ceil(c / 3.2) if s.channel_fraction == 1 / 3.2 else math.ceil(c * s.channel_fraction)
        threshold = sorted(scores, reverse=True)[k]
        keep = [0.0 if v > threshold else 1.0 for v in scores]
        masks.append(keep)

        def confidence(kept):
            pooled = [sum(f[i][ch][p] * (kept[p] if spatial else kept[ch]) for p in range(h * w)) / (h * w)
                      for ch in range(c)]
            logits = [sum(wt[k_][ch] * pooled[ch] for ch in range(c)) + bs[k_] for k_ in range(len(wt))]
            top = max(logits)
            return math.exp(logits[y] - top) / sum(math.exp(v - top) for v in logits)

        drop = confidence([1.0] * len(keep)) - confidence(keep) - s.confidence_offset
        drops.append(drop if drop > 0 else 0.0)
    fraction = s.batch_fraction_start + (epoch // s.batch_fraction_interval) * s.batch_fraction_step
    threshold = sorted(drops, reverse=True)[int(round(float(b) * fraction))]
    selected = [d > threshold for d in drops]
    final = [m if sel else [1.0] * len(m) for m, sel in zip(masks, selected)]
    return final, selected, drops


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, c, h, classes = 6 + seed, 5 + seed % 3, 3 + seed % 2, 4
    features = torch.randn(b, c, h, h, generator=g, dtype=torch.float64).relu()
    labels = torch.randint(0, classes, (b,), generator=g)
    weight = torch.randn(classes, c, generator=g, dtype=torch.float64)
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    s = settings(batch_fraction=0.3, step=0.2)
    for spatial in (True, False):
        for epoch in (0, 15):
            forced = replace(s, spatial_probability=float(spatial))
            result = rsc_mask(features, labels, linear_head(weight, bias), forced, epoch)
            masks, selected, drops = reference_mask(features, labels, weight, bias, s, spatial, epoch)
            assert result.spatial == spatial
            assert result.mask.reshape(b, -1).tolist() == masks
            assert result.selected.tolist() == selected
            assert result.confidence_drop.tolist() == pytest.approx(drops, abs=1e-12)


# ---- the RSC code's numbers ---------------------------------------------------------------------

def test_counts_match_the_rsc_code_expressions():
    # resnet.py:109 math.ceil(HW * 1 / 3.0); :117 math.ceil(num_channel * 1 / 3.2)
    for n in range(2, 4097):
        if math.ceil(n * 1 / 3.0) < n:
            assert muted_count(n, 1 / 3) == math.ceil(n * 1 / 3.0)
        if math.ceil(n * 1 / 3.2) < n:
            assert muted_count(n, 1 / 3.2) == math.ceil(n * 1 / 3.2)
    assert (muted_count(49, 1 / 3), muted_count(512, 1 / 3.2), muted_count(2048, 1 / 3.2)) == (17, 160, 640)
    with pytest.raises(ValueError, match="too small"):
        muted_count(1, 1 / 3)  # a 1x1 feature map cannot be muted spatially


def test_top_k_masks_on_a_7x7_map_and_a_batch_of_128():
    scores = torch.randperm(49, generator=torch.Generator().manual_seed(0)).double().view(1, 49)
    keep = keep_mask(scores, 1 / 3)
    assert keep.sum() == 49 - 17 and set(scores[keep == 0].tolist()) == set(range(32, 49))
    s = settings(batch_fraction=0.3, step=0.2)
    assert [s.batch_fraction(e) for e in (0, 9, 10, 19, 20, 29)] == [0.3, 0.3, 0.5, 0.5, 0.7, 0.7]
    # the RSC code's expression at the epochs where it updates (resnet.py:70-73)
    assert [s.batch_fraction(e) for e in (0, 10, 20)] == [3.0 / 10 + (e / 10) * 2.0 / 10 for e in (0, 10, 20)]
    drops = torch.rand(128, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.01
    assert [int(most_dropped(drops, s.batch_fraction(e)).sum()) for e in (0, 10, 20)] == [38, 64, 90]
    picked = most_dropped(drops, 0.3)
    assert drops[picked].min() > drops[~picked].max()
    few = torch.zeros(128, dtype=torch.float64)
    few[:10] = torch.linspace(0.1, 1.0, 10)
    assert most_dropped(few, 0.3).tolist() == [True] * 10 + [False] * 118  # no drop, no muting
    with pytest.raises(ConfigError, match="batch fraction reaches 1.1 at epoch 40"):
        s.batch_fraction(40)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match=r"method\.spatial_fraction=1.0"):
        settings(spatial_fraction=1.0)
    with pytest.raises(ConfigError, match=r"method\.channel_fraction=0"):
        settings(channel_fraction=0)
    with pytest.raises(ConfigError, match=r"method\.spatial_probability=1.5"):
        settings(spatial_probability=1.5)
    with pytest.raises(ConfigError, match=r"method\.batch_fraction_interval=0"):
        settings(batch_fraction_interval=0)


def test_a_batch_too_small_for_the_threshold_mutes_every_sample_with_a_drop():
    # m = round(B * fraction) >= B: the RSC code's index would run past the batch.
    assert most_dropped(torch.tensor([0.2]), 0.7).tolist() == [True]  # round(0.7) = 1
    assert most_dropped(torch.tensor([0.0]), 0.7).tolist() == [False]  # no drop, no muting
    assert most_dropped(torch.tensor([0.3, 0.0, 0.1]), 0.9).tolist() == [True, False, True]  # round(2.7) = 3
    # below the limit the rule is unchanged: round(4.5) = 4 of 5 (banker's rounding), the top 4
    assert most_dropped(torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1]), 0.9).tolist() == [True] * 4 + [False]


def test_method_keys_are_checked_by_name_and_type_before_anything_is_built():
    node = {"_target_": "opl.methods.rsc.RSCStep", **RSC_KNOBS}
    check_targets({"method": node})
    with pytest.raises(ConfigError, match=r"method\.spatial_fractio is not an option of RSCStep"):
        check_targets({"method": {**node, "spatial_fractio": 0.3}})
    with pytest.raises(ConfigError, match=r"method\.spatial_fraction='abc': expected a finite number"):
        check_targets({"method": {**node, "spatial_fraction": "abc"}})
    with pytest.raises(ConfigError, match=r"method\.batch_fraction_interval=2.5: expected an integer"):
        check_targets({"method": {**node, "batch_fraction_interval": 2.5}})


# ---- gradient, determinism, no side effects -----------------------------------------------------

def test_gradient_against_finite_differences_and_no_parameter_grads():
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    features = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 1])
    grad, logits = true_class_score_grad(features, labels, head)
    assert all(p.grad is None for p in head.parameters()) and features.grad is None and not logits.requires_grad

    def score(x):
        with torch.no_grad():
            return head(x).gather(1, labels.view(-1, 1)).sum().item()

    eps = 1e-6
    numeric = torch.zeros_like(grad)
    for index in range(features.numel()):
        step = torch.zeros(features.numel(), dtype=torch.float64)
        step[index] = eps
        step = step.view_as(features)
        numeric.view(-1)[index] = (score(features.detach() + step) - score(features.detach() - step)) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-8)
    rsc_mask(features, labels, head, settings(), epoch=0, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in head.parameters()) and features.grad is None


def test_choice_is_deterministic_given_a_generator():
    g = torch.Generator().manual_seed(0)
    features = torch.rand(8, 6, 3, 3, generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    head = linear_head(torch.randn(3, 6, generator=g))

    def run(seed, n=24, p=0.5):
        generator = torch.Generator().manual_seed(seed)
        results = [rsc_mask(features, labels, head, settings(spatial_probability=p), 0, generator) for _ in range(n)]
        return [r.spatial for r in results], results

    choices, first = run(7)
    again, second = run(7)
    assert choices == again and all(torch.equal(a.mask, b.mask) for a, b in zip(first, second))
    assert 0 < sum(choices) < len(choices) and run(8)[0] != choices
    generator = torch.Generator().manual_seed(3)
    share = sum(draw_spatial(settings(spatial_probability=0.25), generator) for _ in range(4000)) / 4000
    assert abs(share - 0.25) < 0.03


def test_half_precision_features_keep_their_dtype():
    g = torch.Generator().manual_seed(0)
    features = torch.rand(4, 8, 3, 3, generator=g).to(torch.bfloat16)
    head = linear_head(torch.randn(3, 8, generator=g).to(torch.bfloat16))
    result = rsc_mask(features, torch.tensor([0, 1, 2, 0]), head, settings(spatial_probability=1.0), epoch=0)
    assert result.mask.dtype == torch.bfloat16 and result.confidence_drop.dtype == torch.float32
    assert set(result.mask.unique().tolist()) <= {0.0, 1.0}


# ---- the training step on the trainer ------------------------------------------------------------
class TinyConvNet(nn.Module):
    """A small CNN with the feature_map()/head() split the RSC step needs."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def feature_map(self, x):
        return self.body(x)

    def head(self, feature_map):
        features = feature_map.mean(dim=(2, 3))
        return features, self.fc(features)

    def forward(self, x):
        return self.head(self.feature_map(x))


RSC_KNOBS = dict(spatial_fraction=1 / 3, channel_fraction=0.3125, spatial_probability=0.5,
                 batch_fraction_start=0.3, batch_fraction_step=0.2, batch_fraction_interval=10,
                 confidence_offset=1e-4)


def test_rsc_step_forward_is_the_head_on_the_muted_map():
    torch.manual_seed(0)
    model = TinyConvNet()
    step = RSCStep(model, ce_plus_opl(), **RSC_KNOBS)
    step.bind(step.autocast, torch.device("cpu"), seed=3)
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10) % 7
    parts = step(x, y, torch.arange(10))
    assert {"loss", "ce", "opl", "top1", "rsc_muted"} <= set(parts)
    # Recompute with the same draws: the step's loss is CE + OPL of the head on the muted map.
    generator = torch.Generator().manual_seed(3)
    feature_map = model.feature_map(x)
    muted = rsc_mask(feature_map, y, lambda f: model.head(f)[1], step.settings, 0, generator)
    features, logits = model.head(feature_map * muted.mask)
    expected = ce_plus_opl()(logits, features, y)
    assert parts["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert parts["rsc_muted"].item() == pytest.approx(muted.selected.float().mean().item())
    assert 0 < muted.selected.sum() <= round(10 * 0.3)


def images(side: int, n: int = 8) -> ImageTensors:
    g = torch.Generator().manual_seed(side)
    return ImageTensors(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % 7)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_images_too_small_for_the_feature_map_are_refused_at_bind(as_dataset):
    """TinyConvNet downsamples 16x: 16x16 images give a 1x1 map, where ceil(1/3) = 1 of 1 positions
    leaves no threshold; 32x32 give 2x2 (ceil(4/3) = 2 of 4), which works. Read from in-memory
    images or from a map-style dataset's first item."""
    def split(side):
        tensors = images(side)
        return [(tensors.images[i], int(tensors.labels[i])) for i in range(len(tensors))] if as_dataset else tensors

    step = RSCStep(TinyConvNet(), ce_plus_opl(), types.SimpleNamespace(train=split(16)), **RSC_KNOBS)
    with pytest.raises(ConfigError, match=r"16x16 training images give the model a 1x1 last feature map \(16 "
                                          r"channels\).*dataset\.image_size"):
        step.bind(step.autocast, torch.device("cpu"), seed=0, epochs=1)
    step = RSCStep(TinyConvNet(), ce_plus_opl(), types.SimpleNamespace(train=split(32)), **RSC_KNOBS)
    step.model.train()
    step.bind(step.autocast, torch.device("cpu"), seed=0, epochs=1)
    assert step.model.training  # the probe leaves the model's mode as it was


def test_a_curriculum_reaching_one_is_refused_when_the_trainer_is_built(tmp_path):
    """0.3 + 0.2 * (epoch // 10) reaches 1.1 at 0-based epoch 40: 41 epochs are refused by the
    Trainer's constructor (bind), before any epoch runs or any file is written; 40 are fine."""
    data = DataSpec("tiny", "tiny", 7, images(32), images(32), None, (0.5,) * 3, (0.25,) * 3)

    def build(epochs, run_dir):
        return Trainer(TrainerConfig(epochs=epochs, batch_size=4, device="cpu", num_workers=0, progress="silent"),
                       RSCStep(TinyConvNet(), ce_plus_opl(), data, **RSC_KNOBS), data,
                       lambda params, **kw: torch.optim.SGD(params, lr=0.01), {"kind": "constant"}, run_dir)

    with pytest.raises(ConfigError, match=r"reaches 1.1 at epoch 40.*trainer\.epochs.*method\.batch_fraction_step"):
        build(41, tmp_path / "refused")
    assert list((tmp_path / "refused").iterdir()) == []
    build(40, tmp_path / "fine")


def test_rsc_step_refuses_a_model_without_a_feature_map_and_compile():
    with pytest.raises(ConfigError, match="feature_map"):
        RSCStep(MLP(10, 64, (32,)), ce_plus_opl(), **RSC_KNOBS)
    assert RSCStep.compile_refusal


def test_rsc_on_real_pacs_images_with_mirrored_batches_and_per_domain_validation(tmp_path):
    """The RSC step end to end in the trainer on a few real PACS images (target photo): the
    mirrored copy doubles every training batch, the curriculum's fraction is logged, validation
    reports the top-1 of each source domain, and they average to the pooled figure."""
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/dataset/pacs.yaml").read_text())
    kwargs = {k: v for k, v in config.items() if k not in ("_target_", "root", "image_size")}
    data = pacs(str(require(SHARED_DATA / "pacs")), **{**kwargs, "target": "photo", "image_size": 64,
                                                       "limit_train": 24, "limit_test": 12})
    data = data.with_splits(val=data.val.subset(list(range(0, len(data.val), 40))))
    assert data.augment.mirror_batch and data.val.domain_names == ("art_painting", "cartoon", "sketch")
    torch.manual_seed(0)
    seen = []

    class Recording(RSCStep):
        def forward(self, x, y, index):
            seen.append((x.shape[0], torch.equal(x[x.shape[0] // 2:], x[:x.shape[0] // 2].flip(-1))))
            return super().forward(x, y, index)

    step = Recording(TinyConvNet(), ce_plus_opl(), **RSC_KNOBS)
    trainer = Trainer(TrainerConfig(epochs=1, batch_size=8, eval_batch_size=16, device="cpu", num_workers=0,
                                    progress="line"), step, data,
                      lambda params, **kw: torch.optim.SGD(params, lr=0.01, momentum=0.9),
                      {"kind": "constant"}, tmp_path, seed=0)
    trainer.fit()
    assert seen == [(16, True)] * 3  # 24 images, batches of 8, each followed by its mirror
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["rsc_batch_fraction"] == 0.3 and 0.0 <= record["train_rsc_muted"] <= 0.5
    counts = torch.bincount(data.val.domains, minlength=3).tolist()
    pooled = sum(record[f"val_{d}_top1"] * n for d, n in zip(data.val.domain_names, counts)) / sum(counts)
    assert record["val_top1"] == pytest.approx(pooled)
    assert "test_same_cos" in record and "test_photo_top1" not in record  # the test split is one domain
