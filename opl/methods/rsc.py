"""Representation Self-Challenging (RSC; Huang et al., ECCV 2020): which activations to mute.

Pure functions, no trainer: given the last feature map (B, C, H, W) of a batch, its labels and the
head that maps a feature map to logits, `rsc_mask` returns the 0/1 mask the muted forward multiplies
the feature map by. It follows the RSC code (DeLightCMU/RSC bf6d280,
Domain_Generalization/models/resnet.py:70-150):

1. gradient of the summed true-class logits w.r.t. a detached copy of the feature map (:76-98);
2. channel scores = that gradient averaged over positions; spatial scores = the feature map
   weighted by the channel scores, summed over channels (a Grad-CAM map without ReLU) (:99-103);
3. per batch, spatial muting with probability `spatial_probability`, else channel muting (:106-107);
4. per sample, zero the entries scoring strictly above the k-th largest score, k = ceil(N * fraction)
   (0-based index into the descending sort), i.e. the top k unless there are ties (:109-123);
5. confidence drop = p(true class) before - after muting - offset, negatives set to 0; only samples
   dropping strictly more than the m-th largest drop, m = round(B * batch_fraction), keep their
   mask; the others are not muted (:126-146). The batch fraction follows a per-epoch curriculum
   (:70-73). A batch too small for the threshold (m >= B) mutes every sample with a positive drop.

`RSCStep` is the training step (`method=rsc`) built on them.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opl.errors import ConfigError
from opl.methods.base import TrainingStep


@dataclass(frozen=True)
class RSCSettings:
    spatial_fraction: float  # share of the H*W positions muted (RSC: 1/3)
    channel_fraction: float  # share of the C channels muted (RSC: 1/3.2)
    spatial_probability: float  # chance a batch mutes positions rather than channels (RSC: 0.5)
    batch_fraction_start: float  # share of the batch muted at epoch 0 (RSC: 0.3)
    batch_fraction_step: float  # added every `batch_fraction_interval` epochs (RSC: 0.2 every 10)
    batch_fraction_interval: int
    confidence_offset: float  # subtracted from the confidence drop (RSC: 1e-4)

    def __post_init__(self):
        for key in ("spatial_fraction", "channel_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be in (0, 1)")
        if not 0.0 <= self.spatial_probability <= 1.0:
            raise ConfigError(f"method.spatial_probability={self.spatial_probability} must be in [0, 1]")
        if not 0.0 <= self.batch_fraction_start < 1.0:
            raise ConfigError(f"method.batch_fraction_start={self.batch_fraction_start} must be in [0, 1)")
        if self.batch_fraction_interval < 1:
            raise ConfigError(f"method.batch_fraction_interval={self.batch_fraction_interval} must be >= 1")

    def batch_fraction(self, epoch: int) -> float:
        """Share of the batch muted in 0-based `epoch`: start + step * (epoch // interval)."""
        fraction = self.batch_fraction_start + (epoch // self.batch_fraction_interval) * self.batch_fraction_step
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"the RSC batch fraction reaches {fraction:g} at epoch {epoch}; it must stay below 1 "
                              "(fewer trainer.epochs, or a smaller method.batch_fraction_step)")
        return fraction


@dataclass(frozen=True)
class RSCMask:
    mask: torch.Tensor  # (B, 1, H, W) when spatial, (B, C, 1, 1) otherwise; 0 = muted; ones for unselected samples
    selected: torch.Tensor  # bool (B,): samples whose mask is applied
    spatial: bool
    confidence_drop: torch.Tensor  # (B,), the clamped drop the selection ranked


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    # Rank in at least float32: half-precision scores tie far more often.
    return torch.promote_types(x.dtype, torch.float32)


def true_class_score_grad(features: torch.Tensor, labels: torch.Tensor,
                          classify: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sum_i logits[i, labels[i]] / d features, logits), on a detached copy of `features`;
    no parameter gradient is accumulated."""
    with torch.enable_grad():
        x = features.detach().requires_grad_(True)
        logits = classify(x)
        (grad,) = torch.autograd.grad(logits.gather(1, labels.view(-1, 1)).sum(), x)
    return grad, logits.detach()


def channel_scores(grad: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) gradient -> (B, C): its mean over positions."""
    return grad.to(_score_dtype(grad)).flatten(2).mean(dim=2)


def spatial_scores(features: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): sum over channels of features x channel score."""
    weights = channel_scores(grad)[:, :, None, None]
    return (features.detach().to(weights.dtype) * weights).sum(dim=1).flatten(1)


def muted_count(n: int, fraction: float) -> int:
    """Entries muted out of n: ceil(n * fraction), as the RSC code (which needs it below n)."""
    count = math.ceil(n * fraction)
    if count >= n:
        raise ValueError(f"muting ceil({n} x {fraction}) = {count} of {n} entries leaves no threshold; "
                         "the feature map is too small for this fraction (use a larger image size)")
    return count


def keep_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, N) scores -> (B, N) 0/1: 0 where a score is strictly above the row's k-th largest
    (0-based, descending), k = ceil(N * fraction)."""
    k = muted_count(scores.shape[1], fraction)
    threshold = scores.sort(dim=1, descending=True).values[:, k:k + 1]
    return (scores <= threshold).to(scores.dtype)


def check_feature_map(image_hw: tuple, map_shape: tuple, settings: RSCSettings) -> None:
    """ConfigError unless both mutings leave a threshold on a (C, H, W) feature map of `image_hw` images."""
    c, h, w = map_shape
    for n, fraction, what in ((h * w, settings.spatial_fraction, "positions"),
                              (c, settings.channel_fraction, "channels")):
        try:
            muted_count(n, fraction)
        except ValueError:
            raise ConfigError(
                f"method=rsc: {image_hw[0]}x{image_hw[1]} training images give the model a {h}x{w} last feature map "
                f"({c} channels): RSC would mute ceil({n} x {fraction:.4g}) = {math.ceil(n * fraction)} of its {n} "
                f"{what}, all of them; use a larger dataset.image_size (PACS: 222, a 7x7 map on ResNet)") from None


def feature_mask(features: torch.Tensor, grad: torch.Tensor, spatial: bool, settings: RSCSettings) -> torch.Tensor:
    """The per-sample mask before selection: (B, 1, H, W) if `spatial`, else (B, C, 1, 1)."""
    b, c, h, w = features.shape
    if spatial:
        return keep_mask(spatial_scores(features, grad), settings.spatial_fraction).view(b, 1, h, w)
    return keep_mask(channel_scores(grad), settings.channel_fraction).view(b, c, 1, 1)


def confidence_drop(logits_before: torch.Tensor, logits_after: torch.Tensor, labels: torch.Tensor,
                    offset: float) -> torch.Tensor:
    """max(p_before(y) - p_after(y) - offset, 0) per sample, with p the softmax probabilities."""
    index = labels.view(-1, 1)
    dtype = _score_dtype(logits_before)
    before = F.softmax(logits_before.to(dtype), dim=1).gather(1, index).squeeze(1)
    after = F.softmax(logits_after.to(dtype), dim=1).gather(1, index).squeeze(1)
    return (before - after - offset).clamp(min=0.0)


def most_dropped(drop: torch.Tensor, batch_fraction: float) -> torch.Tensor:
    """bool (B,): drop strictly above the m-th largest (0-based, descending), m = round(B * fraction)
    with Python's round, as the RSC code. Samples without a positive drop are never selected. When m
    reaches B (a small last batch late in the curriculum, e.g. one sample at fraction 0.7; the RSC
    code's training loader drops last batches, its index would run past the batch), every sample
    with a positive drop is selected: the limit of the rule, the drops being clamped at 0."""
    m = round(drop.shape[0] * batch_fraction)
    if m >= drop.shape[0]:
        return drop > 0
    threshold = drop.sort(descending=True).values[m]
    return drop > threshold


def draw_spatial(settings: RSCSettings, generator: torch.Generator | None) -> bool:
    """One draw per batch from a CPU generator (host side, so no device synchronisation)."""
    return bool(torch.rand((), generator=generator) < settings.spatial_probability)


def rsc_mask(features: torch.Tensor, labels: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor],
             settings: RSCSettings, epoch: int, generator: torch.Generator | None = None) -> RSCMask:
    """The RSC mask of one batch. `classify` maps a feature map to logits and must be deterministic
    (the RSC code runs its head in eval mode here); it is called twice, without parameter gradients.
    The training forward is then `classify(features * result.mask)`."""
    grad, logits = true_class_score_grad(features, labels, classify)
    spatial = draw_spatial(settings, generator)
    mask = feature_mask(features, grad, spatial, settings).to(features.dtype)
    with torch.no_grad():
        logits_after = classify(features.detach() * mask)
    drop = confidence_drop(logits, logits_after, labels, settings.confidence_offset)
    selected = most_dropped(drop, settings.batch_fraction(epoch))
    mask = torch.where(selected.view(-1, 1, 1, 1), mask, torch.ones_like(mask))
    return RSCMask(mask, selected, spatial, drop)


class RSCStep(TrainingStep):
    """RSC's training step: the model's last feature map, muted as `rsc_mask` decides, through the
    head; the criterion (CE, or CE + lambda * OPL on the muted pooled features, the vector the
    classifier sees) on the result. The model must offer `feature_map(x)` and `head(map) ->
    (features, logits)` (the timm backbones do). The keywords are the fields of `RSCSettings`, named
    here so the configuration check names a misspelt or mistyped `method.*` key."""

    compile_refusal = ("RSC takes a gradient w.r.t. the feature map inside the step and draws spatial vs "
                       "channel muting on the host; use trainer.compile=false")

    def __init__(self, model: nn.Module, criterion: nn.Module, data=None, *, spatial_fraction: float,
                 channel_fraction: float, spatial_probability: float, batch_fraction_start: float,
                 batch_fraction_step: float, batch_fraction_interval: int, confidence_offset: float):
        super().__init__(model, criterion)
        if not all(callable(getattr(model, name, None)) for name in ("feature_map", "head")):
            raise ConfigError(f"method=rsc needs a model with feature_map() and head() (e.g. model=resnet18 or "
                              f"resnet50); {type(model).__name__} has neither")
        self.settings = RSCSettings(spatial_fraction, channel_fraction, spatial_probability, batch_fraction_start,
                                    batch_fraction_step, batch_fraction_interval, confidence_offset)
        # (C, H, W) of the training images, for the feature-map check in `bind` (None: no data given)
        self.image_shape = None if data is None else _image_shape(data.train)
        self.epoch = 0  # 0-based, as the RSC code's curriculum counts
        self.generator = torch.Generator()

    def bind(self, autocast, device: torch.device, seed: int, epochs: int | None = None) -> None:
        """Also refuses, before any training, a curriculum whose batch fraction reaches 1 within
        `epochs` and images too small for the model's feature map to be muted."""
        super().bind(autocast, device, seed, epochs)
        self.generator.manual_seed(seed)
        if epochs is not None:
            self.settings.batch_fraction(epochs - 1)
        if self.image_shape is not None:
            check_feature_map(self.image_shape[1:], self._feature_map_shape(device), self.settings)

    def _feature_map_shape(self, device: torch.device) -> tuple:
        """(C, H, W) of the model's last feature map for one training-sized image (a shape probe)."""
        was_training = self.model.training
        self.model.eval()  # no batch-norm statistics update, and a batch of one is allowed
        try:
            with torch.no_grad():
                return tuple(self.model.feature_map(torch.zeros((1, *self.image_shape), device=device)).shape[1:])
        finally:
            self.model.train(was_training)

    def rng_state(self) -> dict:
        return {"rsc": self.generator.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["rsc"])

    def before_epoch(self, epoch: int, trainer) -> dict:
        """Called by the Trainer before each (1-based) epoch: the curriculum's batch fraction."""
        self.epoch = epoch - 1
        return {"rsc_batch_fraction": self.settings.batch_fraction(self.epoch)}

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict:
        with self.autocast():
            feature_map = self.model.feature_map(x)
            muted = rsc_mask(feature_map, y, lambda f: self.model.head(f)[1], self.settings, self.epoch, self.generator)
            features, logits = self.model.head(feature_map * muted.mask)
        parts = self.criterion(logits, features, y, index)
        parts["top1"] = self.accuracy(logits, y)
        parts["rsc_muted"] = muted.selected.float().mean()  # share of the batch trained on a muted map
        return parts


def _image_shape(split) -> tuple:
    """(C, H, W) of a split's images: in-memory uint8 tensors, or the first item of a map-style
    dataset (one size per split)."""
    images = getattr(split, "images", None)
    return tuple((images if images is not None else split[0][0]).shape[-3:])
