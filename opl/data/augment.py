"""The training augmentation, in two equivalent forms.

`BatchAugment` works on whole uint8 batches on any device (the GPU-resident path): every sample
gets its own crop offset, flip, jitter factors and jitter order, drawn from a torch.Generator with
no host synchronisation. `pil_transforms` builds the torchvision pipeline of the authors' code
for the authors'-style reference loop. Both follow torchvision's semantics: zero-padded random crop, flip with
p=0.5, ColorJitter with factors uniform in [max(0, 1-x), 1+x] applied in a random order, then
normalisation. (The PIL pipeline rounds to uint8 after each jitter step; the batch form does not.)

`BatchAugment` is split into `sample_params` (eager: random draws) and `apply` (a pure function of
images and parameters), so `DeferredAugment` can draw in the loader while `apply` runs inside a
compiled training step.
"""

import torch
from torch import nn

from opl.data.base import AugmentSpec

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    # Python-scalar weights (torchvision's own formula): no host-to-device copy of a constant, so
    # the function can run inside a CUDA-graph capture.
    r, g, b = GRAY_WEIGHTS
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return x if x.shape[1] == 1 else _blend(x, _grayscale(x), factor)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)


class BatchAugment(nn.Module):
    """uint8 (B, C, H, W) -> normalised float (B, C, H, W), random per sample when training."""

    def __init__(self, spec: AugmentSpec, mean, std):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def sample_params(self, images: torch.Tensor, generator: torch.Generator | None) -> dict:
        b, device, s = images.shape[0], images.device, self.spec

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

        params = {}
        if s.crop_padding:
            params["offsets"] = torch.randint(0, 2 * s.crop_padding + 1, (b, 2), generator=generator, device=device)
        if s.hflip:
            params["flip"] = torch.rand(b, generator=generator, device=device) < 0.5
        if s.jitter:
            strengths = (s.brightness, s.contrast, s.saturation)
            params["factors"] = torch.stack(
                [uniform(max(0.0, 1 - x), 1 + x, b) if x > 0 else torch.ones(b, device=device) for x in strengths], dim=1
            )
            params["order"] = torch.rand(b, 3, generator=generator, device=device).argsort(dim=1)
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Deterministic part: uint8 images and drawn parameters -> augmented floats in [0, 1]."""
        x = images.float().div_(255.0)
        if "offsets" in params:
            x = self._crop(x, params["offsets"])
        if "flip" in params:
            x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        if "factors" in params:
            x = self._jitter(x, params["factors"], params["order"])
        return x

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.spec.crop_padding
        padded = nn.functional.pad(x, (p, p, p, p))
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def _jitter(self, x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        # Slot k applies op order[:, k] to each sample; computing all three and selecting keeps
        # per-sample random order without a Python branch on data.
        for slot in range(3):
            candidates = [op(x, factors[:, i].view(-1, 1, 1, 1)) for i, op in enumerate(JITTER_OPS)]
            chosen = order[:, slot].view(-1, 1, 1, 1)
            x = torch.where(chosen == 0, candidates[0], torch.where(chosen == 1, candidates[1], candidates[2]))
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if not train:
            return self.normalize(images.float().div_(255.0))
        return self.normalize(self.apply(images, self.sample_params(images, generator)))


class DeferredAugment(nn.Module):
    """Stands in for a training loader's `BatchAugment` when the augmentation runs later, inside the
    compiled training step (trainer.capture=with_augment / whole_step).

    Called where the loader augments, it draws the batch's parameters from the loader's generator
    (the same draws, in the same order, as the eager path), keeps them for `take()` and hands the
    uint8 images through unchanged; the step then runs `apply` and `normalize` on them. Exactly one
    `take()` must follow each training batch.
    """

    def __init__(self, augment: BatchAugment):
        super().__init__()
        if augment.spec.mirror_batch:
            raise ValueError("a mirrored batch is built after augmentation in the loader, so its augmentation "
                             "cannot be deferred to the training step")
        self.augment = augment
        self._pending: dict | None = None

    @property
    def spec(self) -> AugmentSpec:
        return self.augment.spec

    def forward(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if not train:
            return self.augment(images, train, generator)
        if self._pending is not None:
            raise RuntimeError("the augmentation parameters of the previous training batch were never taken")
        self._pending = self.augment.sample_params(images, generator)
        return images

    def take(self) -> dict:
        """The parameters drawn for the batch the loader yielded last."""
        if self._pending is None:
            raise RuntimeError("no training batch has been drawn since the last take()")
        params, self._pending = self._pending, None
        return params


def pil_transforms(spec: AugmentSpec, mean, std, train: bool, image_size: int):
    """The authors' torchvision pipeline on PIL images (the reference loop of scripts/benchmark.py)."""
    from torchvision import transforms as T  # about 2 s of imports, paid only where PIL transforms are used

    steps = []
    if train and spec.crop_padding:
        steps.append(T.RandomCrop(image_size, padding=spec.crop_padding))
    if train and spec.hflip:
        steps.append(T.RandomHorizontalFlip())
    if train and spec.jitter:
        steps.append(T.ColorJitter(brightness=spec.brightness, contrast=spec.contrast, saturation=spec.saturation))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def append_mirrored(images: torch.Tensor, *per_sample: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch followed by its horizontally mirrored copy, per-sample tensors (labels, indices)
    repeated: (2B, ...), (2B,), ...

    The RSC code's training loop does this to every batch after per-sample augmentation and
    normalisation (DeLightCMU/RSC bf6d280, Domain_Generalization/train.py:86-88).
    """
    return (torch.cat((images, images.flip(-1))), *(torch.cat((t, t)) for t in per_sample))
