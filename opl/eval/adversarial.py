"""L-infinity white-box attacks in pixel space (images in [0, 1]) for the adversarial-robustness
experiments (paper.md section 3: PGD-trained CIFAR models, with and without OPL).

* `pgd_linf`: Madry et al. (ICLR 2018) projected gradient descent on the cross-entropy: uniform
  random start in the eps-ball, `steps` signed-gradient ascent steps of `step_size`, each followed by
  projection onto the eps-ball around the clean image and onto the valid pixel range [0, 1].
* `fgsm`: Goodfellow et al. (ICLR 2015): a single signed step of size eps from the clean image.

Repository defaults (the TRADES/MART CIFAR protocol): training attacks use eps = 8/255,
step = 2/255, 10 steps; evaluation uses the same eps and step with 20 steps.

The attacked `forward` maps PIXEL images to logits; `normalized_forward` builds it from a model that
expects normalised input, so the eps-ball is always measured in pixel units. Gradients are taken
with `torch.autograd.grad` w.r.t. the input only, so parameters' `.grad` are never touched; the loop
has no host synchronisation, so it can be captured in a CUDA graph. BatchNorm layers in train mode
update their running statistics during the attack: put the model in eval mode first if unwanted.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]


def _input_gradient_sign(forward: Forward, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    # Summed (not averaged) loss: the sign is the same, and per-sample gradients are not shrunk by
    # 1/B, which under low-precision autocast could underflow to zero (a zero sign = no step).
    loss = F.cross_entropy(forward(x).float(), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def _check(eps: float, step_size: float | None = None, steps: int | None = None) -> None:
    if not eps >= 0:
        raise ValueError(f"attack eps must be >= 0, got {eps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"attack step_size must be > 0, got {step_size}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"attack steps must be an int >= 0, got {steps!r}")


def pgd_linf(
    forward: Forward,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Madry PGD-`steps` within the L-inf ball of radius `eps` around `images` (pixels in [0, 1])."""
    _check(eps, step_size, steps)
    images = images.detach()
    # Intersection of the eps-ball and [0, 1] as one per-pixel box (non-empty since images in [0, 1]).
    lower, upper = (images - eps).clamp(min=0.0), (images + eps).clamp(max=1.0)
    x = images.clone()
    if random_start:
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        x = torch.clamp(x + (2.0 * noise - 1.0) * eps, lower, upper)
    with torch.enable_grad():  # the caller may be under no_grad (evaluation)
        for _ in range(steps):
            x = torch.clamp(x + step_size * _input_gradient_sign(forward, x, labels), lower, upper)
    return x.detach()


def fgsm(forward: Forward, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one step of size `eps` from `images`, clamped to [0, 1]."""
    _check(eps)
    images = images.detach()
    with torch.enable_grad():
        step = eps * _input_gradient_sign(forward, images, labels)
    return (images + step).clamp(0.0, 1.0).detach()


def normalized_forward(
    model: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    autocast: Callable[[], AbstractContextManager],
) -> Forward:
    """x_pixels -> logits of `model((x - mean) / std)` (the model returns `(features, logits)`),
    with the model call run under `autocast()`. Normalisation stays in the input's dtype."""
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"need one positive std per mean, got mean={list(mean)}, std={list(std)}")
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:  # built once per device/dtype: no host-to-device copy inside a captured loop
            shape = (1, len(mean), 1, 1)
            cache[key] = (torch.tensor(list(mean), device=x.device, dtype=x.dtype).view(shape),
                          torch.tensor(list(std), device=x.device, dtype=x.dtype).view(shape))
        m, s = cache[key]
        with autocast():
            return model((x - m) / s)[1]

    return forward
